"""Wrap a built model for training, as explicit steps (in the spirit of torchtitan's
``parallelize_*``): freeze the named parts, cast to bf16 behind Megatron-Core's
``Float16Module``, and hand it to Megatron-Core's ``DistributedDataParallel``."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.transformer.module import Float16Module

from mm1_megatron.config.schema import ModelPart


def freeze_parts(model: torch.nn.Module, names: Sequence[ModelPart]) -> None:
    """``requires_grad=False`` for the parameters of each named child (absent ones, such as
    the vision encoder on a later pipeline stage, are skipped)."""
    for name in names:
        module = getattr(model, name, None)
        for param in module.parameters() if module is not None else ():
            param.requires_grad_(False)


def resolve_overlap(parallel, *, cuda: bool) -> Tuple[bool, bool]:
    """``(overlap_grad_reduce, overlap_param_gather)`` for this run: the configured values,
    or for ``None`` on with CUDA and off on CPU (the param gather only with the
    distributed optimizer)."""
    grad = cuda if parallel.overlap_grad_reduce is None else parallel.overlap_grad_reduce
    param = parallel.overlap_param_gather
    if param is None:
        param = cuda and parallel.use_distributed_optimizer
    return bool(grad), bool(param)


def wrap_for_training(
    model: torch.nn.Module,
    *,
    device: torch.device,
    freeze: Sequence[ModelPart] = (),
    bf16: bool = False,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    overlap_param_gather: bool = False,
) -> DistributedDataParallel:
    """``model`` on ``device``, frozen parts frozen, bf16 if asked, inside DDP (gradients
    reduced in fp32; bucket reductions overlapped with the backward pass and parameter
    all-gathers with the forward pass when asked)."""
    model = model.to(device)
    freeze_parts(model, freeze)
    if bf16:
        model = Float16Module(model.config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
