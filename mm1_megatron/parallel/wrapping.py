"""Wrap a built model for training, as explicit steps (in the spirit of torchtitan's
``parallelize_*``): freeze the named parts, cast to bf16 behind Megatron-Core's
``Float16Module``, and hand it to Megatron-Core's ``DistributedDataParallel``."""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module


def freeze_parts(model: torch.nn.Module, names: Sequence[str]) -> None:
    """``requires_grad=False`` for the parameters of each named child (absent ones, such as
    the vision encoder on a later pipeline stage, are skipped)."""
    for name in names:
        module = getattr(model, name, None)
        for param in module.parameters() if module is not None else ():
            param.requires_grad_(False)


def wrap_for_training(
    model: torch.nn.Module,
    *,
    device: torch.device,
    freeze: Sequence[str] = (),
    bf16: bool = False,
    use_distributed_optimizer: bool = False,
) -> DistributedDataParallel:
    """``model`` on ``device``, frozen parts frozen, bf16 if asked, inside DDP (gradients
    reduced in fp32, buckets reduced after the backward pass)."""
    model = model.to(device)
    freeze_parts(model, freeze)
    if bf16:
        model = Float16Module(model.config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
