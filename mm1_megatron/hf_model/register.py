"""Importing this module registers ``model_type: mm1`` with the ``transformers`` Auto classes.

An exported MM1 folder then loads with our modules and without ``trust_remote_code``
(the registered classes take precedence over the folder's ``auto_map``)::

    import mm1_megatron.hf_model.register  # noqa: F401  (registers "mm1")
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained("exports/mm1_debug")

Without our package, ``from_pretrained(..., trust_remote_code=True)`` loads the copies of
the same modules that the exporter puts in the folder.
"""

from transformers import AutoConfig, AutoModelForImageTextToText

from mm1_megatron.hf_model.configuration_mm1 import MM1HFConfig
from mm1_megatron.hf_model.connectors_mm1 import CONNECTORS, build_connector_net
from mm1_megatron.hf_model.modeling_mm1 import MM1ForConditionalGeneration, MM1PreTrainedModel

AutoConfig.register("mm1", MM1HFConfig, exist_ok=True)
AutoModelForImageTextToText.register(MM1HFConfig, MM1ForConditionalGeneration, exist_ok=True)

__all__ = [
    "CONNECTORS",
    "MM1ForConditionalGeneration",
    "MM1HFConfig",
    "MM1PreTrainedModel",
    "build_connector_net",
]
