"""Helpers shared by the stand-in linear modules: parameter creation and TP communication.

Communication follows TE v2.14 ``module/linear.py`` ``_Linear.forward``: a column-parallel
layer with ``sequence_parallel`` all-gathers its input along dim 0 first; a row-parallel
layer all-reduces its output, or reduce-scatters it along dim 0 with ``sequence_parallel``,
and adds the bias after that ("For RPL, bias has to be added after TP collectives",
linear.py:1315). In ``_Linear.backward`` (and ``_LayerNormLinear.backward``) a column-
parallel layer reduces its input gradient over ``tp_group``: a reduce-scatter along dim 0
with ``sequence_parallel``, otherwise an all-reduce ("column_parallel_comm_dgrad"), since
each rank holds only its slice of the output's gradient. The collectives are
Megatron-Core's autograd mappings on ``tp_group`` (whose backward is that reduction),
skipped when TE was given no group or ``tp_size == 1``.
"""

from typing import Optional

import torch

from transformer_engine.pytorch.utils import resolve_device  # noqa: F401

PARALLEL_MODES = (None, "column", "row")


def partition(size: int, tp_size: int, what: str) -> int:
    if size % tp_size != 0:
        raise RuntimeError(f"{what}={size} is not divisible by tp_size={tp_size}")
    return size // tp_size


def set_tp_attributes(tensor: torch.Tensor, dim: int) -> None:
    """TE's ``set_tensor_model_parallel_attributes`` (``distributed.py``), stride 1."""
    tensor.tensor_model_parallel = True
    tensor.partition_dim = dim
    tensor.partition_stride = 1


def _communicating(module) -> bool:
    return module.tp_group is not None and module.tp_size > 1


def gather_input(module, x: torch.Tensor) -> torch.Tensor:
    """Column-parallel input: all-gather the sequence-parallel shards along dim 0 (backward:
    reduce-scatter), or pass a replicated input through (backward: all-reduce)."""
    if module.parallel_mode != "column" or not _communicating(module):
        return x
    from megatron.core.tensor_parallel import mappings

    if module.sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(x, group=module.tp_group)
    return mappings.copy_to_tensor_model_parallel_region(x, group=module.tp_group)


def reduce_output(module, out: torch.Tensor) -> torch.Tensor:
    """Row-parallel output: reduce-scatter (sequence parallel) or all-reduce."""
    if module.parallel_mode != "row" or not _communicating(module):
        return out
    from megatron.core.tensor_parallel import mappings

    if module.sequence_parallel:
        return mappings.reduce_scatter_to_sequence_parallel_region(out, group=module.tp_group)
    return mappings.reduce_from_tensor_model_parallel_region(out, group=module.tp_group)


def linear_with_bias(module, x: torch.Tensor, weight, bias: Optional[torch.Tensor]):
    """GEMM, TP collective, then the bias unless ``return_bias``; TE's return convention."""
    out = torch.nn.functional.linear(x, weight.to(x.dtype))
    out = reduce_output(module, out)
    if module.use_bias and module.apply_bias:
        out = out + bias.to(out.dtype)
    if module.return_bias:
        return out, bias.to(out.dtype) if module.use_bias else bias
    return out


def empty_bias(dtype, device) -> torch.Tensor:
    """Without bias TE stores a plain empty tensor attribute, not a parameter
    (linear.py:1284-1287), so ``state_dict()`` has no ``bias`` key."""
    return torch.Tensor().to(dtype=dtype, device=device)
