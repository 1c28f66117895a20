"""The MM1 model as a ``transformers`` model, registered with the Auto classes.

Importing this package registers ``model_type: mm1``, after which an exported folder
loads without ``trust_remote_code``::

    import mm1_megatron.conversion.hf_model  # noqa: F401  (registers "mm1")
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained("exports/mm1_debug")
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from mm1_megatron.conversion.hf_model.configuration_mm1 import MM1HFConfig
from mm1_megatron.conversion.hf_model.modeling_mm1 import (
    MM1ForConditionalGeneration,
    MM1PreTrainedModel,
    build_connector_net,
)

AutoConfig.register("mm1", MM1HFConfig, exist_ok=True)
AutoModelForImageTextToText.register(MM1HFConfig, MM1ForConditionalGeneration, exist_ok=True)

__all__ = [
    "MM1ForConditionalGeneration",
    "MM1HFConfig",
    "MM1PreTrainedModel",
    "build_connector_net",
]
