"""Measured memory of a real training step, to compare with ``mm1 estimate``.

On a GPU the CUDA allocator's own counters are the measurement. On CPU there are none,
so ``LiveTensorBytes`` counts what PyTorch allocates: every storage an operator creates
(seen through a ``TorchDispatchMode``; an output that aliases an input, a view or an
in-place result, is no allocation) is added to a live total when it appears and
subtracted when it is freed (a weak reference's callback), and the highest total is the
peak. Storages that exist before the step (parameters, gradient buffers, optimizer
state) are measured by walking the model and optimizer. Kernel-internal scratch space
that never becomes a tensor is not seen (on a GPU it is part of the allocator's peak).
"""

from __future__ import annotations

import gc
import logging
import weakref
from dataclasses import asdict, dataclass
from typing import Dict, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

logger = logging.getLogger(__name__)


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: Dict[int, weakref.ref] = {}

    def _freed(self, key: int, nbytes: int) -> None:
        self._refs.pop(key, None)
        self.live -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        known = self._refs.get(key)
        if known is not None and known() is storage:
            return
        nbytes = storage.nbytes()
        self._refs[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._freed(k, n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results alias an input: only other outputs are allocations
        # (this also keeps storages made before the mode, such as the weights, out).
        inputs = {
            id(value.untyped_storage())
            for value in tree_flatten((args, kwargs))[0]
            if isinstance(value, torch.Tensor)
        }
        for value in tree_flatten(out)[0]:
            if (
                isinstance(value, torch.Tensor)
                and value.device.type != "meta"
                and id(value.untyped_storage()) not in inputs
            ):
                self._track(value)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views counted once)."""
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class MeasuredMemory:
    """Bytes of one training step on one rank."""

    weights: int
    gradients: int
    optimizer_states: int
    step_peak: int  # highest memory during the step, static parts included
    device: str

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimizer_states

    @property
    def activations_peak(self) -> int:
        """What the step adds on top of the static parts at its highest point."""
        return self.step_peak - self.static

    def to_dict(self) -> Dict[str, int]:
        return {**asdict(self), "static": self.static, "activations_peak": self.activations_peak}


def _all_tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _all_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _all_tensors(value)


def static_parts(model_chunks, optimizer) -> Dict[str, int]:
    """Bytes of the weights, the gradient buffers and the optimizer state of a trainer."""
    params = [p for chunk in model_chunks for p in chunk.parameters()]
    grads = [p.main_grad for p in params if getattr(p, "main_grad", None) is not None]
    weight_ptrs = {p.untyped_storage().data_ptr() for p in params}
    grad_ptrs = {g.untyped_storage().data_ptr() for g in grads}
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    state = []
    for opt in optimizers:
        inner = getattr(opt, "optimizer", opt)
        state.extend(_all_tensors(list(inner.state.values())))
        for group in inner.param_groups:  # fp32 main copies of bf16 weights
            state.extend(group["params"])
    state = [
        t
        for t in state
        if t.untyped_storage().data_ptr() not in weight_ptrs | grad_ptrs and t.numel() > 1
    ]
    return {
        "weights": storage_bytes(params),
        "gradients": storage_bytes(grads),
        "optimizer_states": storage_bytes(state),
    }


def measure_train_step(trainer, *, warmup_steps: int = 1) -> MeasuredMemory:
    """Run ``warmup_steps`` steps (optimizer state is created on the first), then measure
    one more: its peak, and the static parts before it."""
    for _ in range(warmup_steps):
        trainer.train_step()
    gc.collect()
    static = static_parts(trainer.model_chunks, trainer.optimizer)
    device = trainer.ctx.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainer.train_step()
        torch.cuda.synchronize(device)
        extra = torch.cuda.max_memory_allocated(device) - before
        # Anything else resident before the step (buffers, caches) counts as activations.
        leftover = before - sum(static.values())
        peak = sum(static.values()) + extra + max(leftover, 0)
    else:
        with LiveTensorBytes() as tracker:
            trainer.train_step()
        peak = sum(static.values()) + tracker.peak
    return MeasuredMemory(**static, step_peak=peak, device=str(device))
