"""Importing this module registers ``model_type: mm1`` with the ``transformers`` Auto classes.

An exported MM1 folder then loads with our modules and without ``trust_remote_code``
(the registered classes take precedence over the folder's ``auto_map``)::

    import mm1_megatron.hf_model.register  # noqa: F401  (registers "mm1")
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained("exports/mm1_debug")

Without our package, ``from_pretrained(..., trust_remote_code=True)`` loads the copies of
the same modules that the exporter puts in the folder.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText

from mm1_megatron.hf_model.configuration_mm1 import MM1HFConfig
from mm1_megatron.hf_model.connectors_mm1 import CONNECTORS, build_connector_net
from mm1_megatron.hf_model.image_processing_mm1 import MM1ImageProcessor
from mm1_megatron.hf_model.modeling_mm1 import MM1ForConditionalGeneration, MM1PreTrainedModel
from mm1_megatron.hf_model.processing_mm1 import MM1Processor

AutoConfig.register("mm1", MM1HFConfig, exist_ok=True)
AutoModelForImageTextToText.register(MM1HFConfig, MM1ForConditionalGeneration, exist_ok=True)
# The tiling image processor is found by its name (``image_processor_type``), so exports
# that ship a CLIPImageProcessor keep it. MM1Processor is not registered with
# AutoProcessor: that would also claim exports written before every MM1 export had a
# ``processor_config.json``, and load them with its defaults (``num_image_tokens``);
# ``MM1Processor.from_pretrained`` loads an export's processor without remote code.
AutoImageProcessor.register(MM1HFConfig, MM1ImageProcessor, exist_ok=True)

__all__ = [
    "CONNECTORS",
    "MM1ForConditionalGeneration",
    "MM1HFConfig",
    "MM1ImageProcessor",
    "MM1PreTrainedModel",
    "MM1Processor",
    "build_connector_net",
]
