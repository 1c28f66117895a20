"""MM1 model components. Models never import from ``mm1_megatron.training``.

Exports are resolved lazily so that the pure-tensor helpers (``inputs``,
``param_count``) can be imported without loading Megatron-Core.
"""

import importlib

_EXPORTS = {
    "build_mm1_model": "mm1_megatron.models.builder",
    "MM1Model": "mm1_megatron.models.mm1_model",
    "RuntimeOptions": "mm1_megatron.models.transformer_configs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
