"""Hugging Face <-> mm1_megatron conversion (``mm1-convert``; see docs/conversion.md).

- ``importer``: Llama / Mistral / Qwen2 / Mixtral language models and CLIP vision towers
  into a model-only checkpoint that loads at any TP/PP/EP layout.
- ``exporter``: a checkpoint of any layout to ``transformers`` folders: the whole model
  (``hf_model.MM1ForConditionalGeneration``), LLaVA, the decoder alone or the ViT alone.
- ``mapping``: which tensor goes where, shared by both directions.

Exports resolve lazily, so importing this package does not load Megatron-Core or
``transformers``.
"""

import importlib

_EXPORTS = {
    "ImportRequest": "mm1_megatron.conversion.importer",
    "import_checkpoint": "mm1_megatron.conversion.importer",
    "ExportRequest": "mm1_megatron.conversion.exporter",
    "export_checkpoint": "mm1_megatron.conversion.exporter",
    "ConversionError": "mm1_megatron.conversion.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
