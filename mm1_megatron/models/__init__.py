"""MM1 model components. Models never import from ``mm1_megatron.training``."""

from mm1_megatron.models.builder import build_mm1_model
from mm1_megatron.models.mm1_model import MM1Model
from mm1_megatron.models.transformer_configs import RuntimeOptions

__all__ = ["MM1Model", "RuntimeOptions", "build_mm1_model"]
