"""``transformer_engine.pytorch.attention``: ``DotProductAttention`` only. ``rope``
(fused RoPE), ``_SplitAlongDim`` and ``MultiheadAttention`` are absent on purpose:
Megatron-Core imports them inside try blocks and then uses its own implementations."""

from transformer_engine.pytorch.attention.dot_product_attention import (  # noqa: F401
    DotProductAttention,
)
