"""MM1 model components. Models never import from ``mm1_megatron.training``.

Exports are resolved lazily so that the pure-tensor helpers (``inputs``,
``param_count``) can be imported without loading Megatron-Core.
"""

from mm1_megatron.utils.lazy import lazy_getattr

_EXPORTS = {
    "build_mm1_model": "mm1_megatron.models.builder",
    "MM1Model": "mm1_megatron.models.mm1_model",
    "RuntimeOptions": "mm1_megatron.models.transformer_configs",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
