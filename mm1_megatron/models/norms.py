"""Torch LayerNorm / RMSNorm for the local (no apex, no TE) layer specs.

Megatron-Core's ``WrappedTorchNorm`` refuses sequence parallelism. Under SP each
tensor-parallel rank normalises a different slice of the sequence, so the norm weights
see different gradients per rank; marking them ``sequence_parallel`` makes Megatron's
``finalize_model_grads`` all-reduce those gradients across the TP group, which is all the
norm needs to be correct.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` per ``config.normalization``."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centred gamma needs Transformer Engine or apex norms")
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
