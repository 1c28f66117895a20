"""Former home of the ``transformers`` MM1 model, now ``mm1_megatron.hf_model``.

Kept because the model cards of folders exported before the move say
``import mm1_megatron.conversion.hf_model``: importing it still registers ``model_type: mm1``
(see ``mm1_megatron/hf_model/register.py``).
"""

from mm1_megatron.hf_model.register import (  # noqa: F401  (registers "mm1")
    CONNECTORS,
    MM1ForConditionalGeneration,
    MM1HFConfig,
    MM1PreTrainedModel,
    build_connector_net,
)

__all__ = [
    "CONNECTORS",
    "MM1ForConditionalGeneration",
    "MM1HFConfig",
    "MM1PreTrainedModel",
    "build_connector_net",
]
