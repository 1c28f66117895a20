"""Hugging Face <-> mm1_megatron conversion (``mm1 convert``; see docs/conversion.md).

- ``importer``: Llama / Mistral / Qwen2 / Mixtral language models and CLIP vision towers
  into a model-only checkpoint that loads at any TP/PP/EP layout.
- ``exporter``: a checkpoint of any layout to ``transformers`` folders: the whole model
  (``MM1ForConditionalGeneration``, from ``mm1_megatron.hf_model``), LLaVA, the decoder
  alone or the ViT alone.
- ``mapping``: which tensor goes where, shared by both directions.

Exports resolve lazily, so importing this package does not load Megatron-Core or
``transformers``.
"""

from mm1_megatron.utils.lazy import lazy_getattr

_EXPORTS = {
    "ImportRequest": "mm1_megatron.conversion.importer",
    "import_checkpoint": "mm1_megatron.conversion.importer",
    "ExportRequest": "mm1_megatron.conversion.exporter",
    "export_checkpoint": "mm1_megatron.conversion.exporter",
    "ConversionError": "mm1_megatron.conversion.errors",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
