"""``transformer_engine.pytorch.fp8``: the deprecated re-export of ``quantization``
(TE v2.14 ``pytorch/fp8.py``), which Megatron-Core still imports on both lines."""

from transformer_engine.common.recipe import DelayedScaling, Format, Recipe  # noqa: F401
from transformer_engine.pytorch.quantization import (  # noqa: F401
    FP8GlobalStateManager,
    autocast,
    fp8_autocast,
    fp8_model_init,
    is_fp8_available,
)
