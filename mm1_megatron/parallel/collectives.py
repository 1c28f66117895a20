"""The collectives this project issues itself, each on its process group's device.

An NCCL group accepts only CUDA tensors and a gloo group only CPU tensors; a tensor on the
wrong device fails at run time ("No backend type associated with device type cpu"), and
on a CPU-only test machine every tensor is on the CPU, so the mistake is invisible there.
Hence one rule, checked in one place: every collective of ours goes through this module
(a test parses the tree for direct ``torch.distributed`` calls), the helpers build their
tensors on ``group_device(group)``, and ``check_on_group_device`` rejects a caller's
tensor on any other device. Megatron-Core's own collectives are its business.

Without an initialised process group (single-process tools and tests) every helper
returns its input unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_device(group=None) -> torch.device:
    """The device whose tensors a collective on ``group`` takes: the current CUDA device
    for NCCL, the CPU otherwise (gloo, MPI, and no process group at all)."""
    if _initialized() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_on_group_device(tensor: torch.Tensor, group=None) -> None:
    expected = group_device(group)
    if tensor.device.type != expected.type:
        backend = dist.get_backend(group) if _initialized() else "none"
        raise ValueError(
            f"collective on a {backend} group got a tensor on {tensor.device}; "
            f"it must be on {expected} (use mm1_megatron.parallel.collectives)"
        )


def all_reduce_(tensor: torch.Tensor, *, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor that must already be on the group's device."""
    if _initialized():
        check_on_group_device(tensor, group)
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def all_reduce_values(values: Sequence[float], *, op: str = "sum", group=None) -> List[float]:
    """All-reduce Python numbers (as float64) and return them as Python floats."""
    if not _initialized():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=group_device(group))
    return all_reduce_(tensor, op=op, group=group).tolist()


def broadcast_int(value: int, *, src: int = 0, group=None) -> int:
    """``value`` of global rank ``src`` on every rank."""
    if not _initialized():
        return int(value)
    tensor = torch.tensor([int(value)], dtype=torch.long, device=group_device(group))
    dist.broadcast(tensor, src=src, group=group)
    return int(tensor.item())


def barrier(group=None) -> None:
    """``dist.barrier``; on NCCL with this rank's device named, so no device is guessed."""
    if not _initialized():
        return
    device = group_device(group)
    device_ids: Optional[List[int]] = [device.index] if device.type == "cuda" else None
    dist.barrier(group=group, device_ids=device_ids)


def broadcast_(tensor: torch.Tensor, *, src: int, group=None) -> torch.Tensor:
    """In-place broadcast from global rank ``src`` of a tensor on the group's device."""
    if _initialized():
        check_on_group_device(tensor, group)
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def send(tensor: torch.Tensor, *, dst: int, group=None) -> None:
    """Point-to-point send to global rank ``dst`` (pipeline stages during generation)."""
    check_on_group_device(tensor, group)
    dist.send(tensor.contiguous(), dst=dst, group=group)


def recv_(tensor: torch.Tensor, *, src: int, group=None) -> torch.Tensor:
    """Receive into ``tensor`` from global rank ``src``."""
    check_on_group_device(tensor, group)
    dist.recv(tensor, src=src, group=group)
    return tensor


def all_gather_objects(value, group=None) -> list:
    """Every rank's picklable ``value``, in rank order (a one-element list without a
    process group). For small results, such as evaluation predictions."""
    if not _initialized():
        return [value]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def all_gather_tensor(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``[world, *tensor.shape]``: every rank's ``tensor`` (same shape and dtype on every
    rank) in rank order, on the CPU; ``tensor[None]`` without a process group."""
    if not _initialized():
        return tensor[None].cpu()
    device = group_device(group)
    local = tensor.to(device).contiguous()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return torch.stack(gathered).cpu()


class _GatherSequence(torch.autograd.Function):
    """Forward: every rank's ``local`` placed at its positions along ``dim`` of the whole
    sequence. Backward: each rank used the whole sequence, so a local piece's gradient is
    the sum over ranks of the gradient at its positions (an all-reduce, then this rank's
    positions: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, local, dim, positions, group):
        check_on_group_device(local, group)
        rank = dist.get_rank(group) if _initialized() else 0
        if local.shape[dim] != positions[rank].numel():
            raise ValueError(
                f"rank {rank} holds {local.shape[dim]} positions along dim {dim}, "
                f"its layout says {positions[rank].numel()}"
            )
        pieces = [local.contiguous()]
        if _initialized():
            pieces = [torch.empty_like(pieces[0]) for _ in positions]
            dist.all_gather(pieces, local.contiguous(), group=group)
        shape = list(local.shape)
        shape[dim] = sum(p.numel() for p in positions)
        whole = local.new_empty(shape)
        for piece, where in zip(pieces, positions):
            whole.index_copy_(dim, where.to(local.device), piece)
        ctx.dim, ctx.group = dim, group
        ctx.own = positions[rank].to(local.device)
        return whole

    @staticmethod
    def backward(ctx, grad):
        grad = all_reduce_(grad.contiguous(), group=ctx.group)
        return grad.index_select(ctx.dim, ctx.own), None, None, None


def gather_sequence(
    local: torch.Tensor, *, dim: int, positions: Sequence[torch.Tensor], group=None
) -> torch.Tensor:
    """The whole sequence from each rank's share (autograd-aware). ``positions[r]``: where
    rank ``r``'s pieces along ``dim`` go (every rank's positions together cover
    ``0 .. total - 1`` once; every rank holds as many). Without a process group:
    ``local`` placed at ``positions[0]``."""
    return _GatherSequence.apply(local, dim, list(positions), group)
