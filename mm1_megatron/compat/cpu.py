"""Let Megatron-Core run on a machine without CUDA (CPU tensors, gloo collectives).

Megatron-Core assumes CUDA in three ways, and this module answers each one:

1. It calls ``torch.cuda`` functions (``current_device``, RNG state, streams, events,
   ``synchronize``). On a machine without CUDA these raise or silently do nothing. We
   replace them with CPU equivalents: the "CUDA" RNG *is* the CPU generator, streams and
   events are no-ops, and ``current_device()`` returns the CPU device.
2. It creates tensors on ``device='cuda'`` / ``torch.cuda.current_device()`` (some in
   pinned host memory first) and calls ``Tensor.cuda()``. A ``TorchFunctionMode``
   rewrites every CUDA device argument to ``cpu``, ``pin_memory=True`` to ``False``, and
   turns ``.cuda()`` into a no-op. The mode also makes ``Tensor.type()``
   report ``torch.cuda.*Tensor``, because the optimizers check parameter types by
   string.
3. gloo's limits on the collectives Megatron-Core issues (``compat/gloo.py``).

``enable_cpu_execution()`` is idempotent and does nothing when CUDA is available, so the
same code path runs on GPUs with NCCL untouched. Call it before building any
Megatron-Core object (``mm1_megatron.parallel.init_distributed`` does).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

from mm1_megatron.compat import gloo
from mm1_megatron.compat.patching import register_patch, replace_attribute

logger = logging.getLogger(__name__)

_state = {"enabled": False, "mode": None}

# The torch.cuda functions were read in torch 2.10-2.13; megatron-core's RNG helpers in
# 0.16.1 and 0.19.2 (same names and signatures in both).
_TORCH = "torch 2.10-2.13"
_MCORE = "megatron-core 0.16.1-0.19.2"


def cpu_execution_enabled() -> bool:
    """True when the CPU stand-ins are installed (CUDA absent)."""
    return _state["enabled"]


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare index means a CUDA ordinal in torch
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _to_cpu_device(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU for every torch call made while active."""

    # Every torch call on CPU runs through here (tens of thousands per training step), so
    # the common case, no device argument and none of the three methods below, is kept
    # to a set lookup and a dict test.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _DEVICE_METHODS:
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                tensor = args[0]
                if tensor.dtype in _CUDA_TYPE_NAMES:
                    return _CUDA_TYPE_NAMES[tensor.dtype]
            if func is torch.Tensor.to and len(args) > 1:
                args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        if not kwargs:
            return func(*args)
        if "device" in kwargs:
            kwargs = dict(kwargs)
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):  # no pinned memory without an accelerator
            kwargs = dict(kwargs)
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


_DEVICE_METHODS = frozenset((torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to))


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def record_event(self, *args, **kwargs):
        return _NoOpStream()

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _cpu_get_rng_state(device=None, clone=False, graph_safe=False):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed) -> None:
    # torch.manual_seed itself calls cuda.manual_seed_all, so seed the CPU generator
    # directly rather than through torch.manual_seed.
    torch.default_generator.manual_seed(int(seed))


def _torch_cuda_stand_ins() -> dict:
    return {
        # A device object rather than an ordinal: Megatron mostly passes it as
        # ``device=``, and backward passes run outside the function mode.
        "current_device": lambda: torch.device("cpu"),
        "device_count": lambda: 0,
        "synchronize": lambda *args, **kwargs: None,
        "empty_cache": lambda: None,
        "Stream": _NoOpStream,
        "Event": _NoOpStream,
        "current_stream": lambda *args, **kwargs: _NoOpStream(),
        "default_stream": lambda *args, **kwargs: _NoOpStream(),
        "stream": lambda *args, **kwargs: contextlib.nullcontext(),
        "set_stream": lambda *args, **kwargs: None,
        "get_rng_state": _cpu_get_rng_state,
        "set_rng_state": _cpu_set_rng_state,
        "manual_seed": _cpu_manual_seed,
        "memory_allocated": lambda *args, **kwargs: 0,
        "max_memory_allocated": lambda *args, **kwargs: 0,
        "memory_stats": lambda *args, **kwargs: {},
    }


def _patch_torch_cuda() -> None:
    reason = "Megatron-Core calls torch.cuda without a GPU"
    for name, stand_in in _torch_cuda_stand_ins().items():
        replace_attribute(
            torch.cuda, name, stand_in, reason=reason, written_for=_TORCH, scope="cpu"
        )
    for name, stand_in in (
        ("get_rng_state", _cpu_get_rng_state),
        ("set_rng_state", _cpu_set_rng_state),
    ):
        replace_attribute(
            torch.cuda.random, name, stand_in, reason=reason, written_for=_TORCH, scope="cpu"
        )


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    # The TP RNG tracker forks "CUDA" RNG states; on CPU the CPU generator is the one
    # dropout draws from, so that is the state it must fork.
    reason = "the TP RNG tracker must fork the CPU generator on CPU"
    replace_attribute(
        mcore_random,
        "_get_cuda_rng_state",
        _cpu_get_rng_state,
        reason=reason,
        written_for=_MCORE,
        scope="cpu",
    )
    replace_attribute(
        mcore_random,
        "_set_cuda_rng_state",
        _cpu_set_rng_state,
        reason=reason,
        written_for=_MCORE,
        scope="cpu",
    )


def enable_cpu_execution(*, force: bool = False) -> bool:
    """Install the CPU stand-ins if CUDA is absent, or with ``force`` for CPU-only work on
    a GPU host (checkpoint conversion), so that nothing opens a CUDA context. Returns True
    when they are active."""
    if _state["enabled"]:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_torch_cuda()
    _patch_megatron_rng()
    gloo.patch_collectives_for_gloo()
    mode = _CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process (this thread)
    register_patch(
        "torch.overrides.TorchFunctionMode (cuda devices -> cpu)",
        reason="Megatron-Core creates tensors on 'cuda'",
        written_for=_MCORE,
        scope="cpu",
    )
    _state.update(enabled=True, mode=mode)
    logger.info("CUDA not available: running Megatron-Core on CPU (gloo backend).")
    return True
