"""``transformer_engine.pytorch``: the stand-in modules Megatron-Core's TE wrappers subclass.

Exported like TE v2.14 ``pytorch/__init__.py``: ``Linear``, ``LayerNormLinear``,
``GroupedLinear``, ``LayerNorm``, ``RMSNorm``, ``DotProductAttention``, ``fp8_autocast``,
``autocast``, ``fp8_model_init``, ``is_fp8_available`` and the ``ops``, ``distributed``,
``module`` submodules. Deliberately absent (``AttributeError``/``ImportError``, and
Megatron-Core falls back to its own code): ``optimizers`` (so Megatron-Core uses
``torch.optim.AdamW`` and its non-fused grad-norm path, as without TE), ``LayerNormMLP``,
``Fp8Padding``, ``permutation``, ``cross_entropy``, ``cpp_extensions``, ``tensor``,
``graph``, ``cpu_offload``, ``router`` and the attention ``rope``.
"""

from transformer_engine.pytorch import distributed, ops  # noqa: F401
from transformer_engine.pytorch.attention import DotProductAttention  # noqa: F401
from transformer_engine.pytorch.module import (  # noqa: F401
    GroupedLinear,
    LayerNorm,
    LayerNormLinear,
    Linear,
    RMSNorm,
)
from transformer_engine.pytorch.quantization import (  # noqa: F401
    autocast,
    fp8_autocast,
    fp8_model_init,
    is_fp8_available,
    quantized_model_init,
)
