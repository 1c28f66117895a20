"""Let Megatron-Core run on a machine without CUDA (CPU tensors, gloo collectives).

Megatron-Core assumes CUDA in three ways, and this module answers each one:

1. It calls ``torch.cuda`` functions (``current_device``, RNG state, streams, events,
   ``synchronize``). On a CPU-only build these raise or silently do nothing. We replace
   them with CPU equivalents: the "CUDA" RNG *is* the CPU generator, streams and events
   are no-ops, and ``current_device()`` returns the CPU device.
2. It creates tensors on ``device='cuda'`` / ``torch.cuda.current_device()`` and calls
   ``Tensor.cuda()``. A ``TorchFunctionMode`` rewrites every CUDA device argument to
   ``cpu`` and turns ``.cuda()`` into a no-op. The mode also makes ``Tensor.type()``
   report ``torch.cuda.*Tensor``, because the optimizers check parameter types by
   string.
3. Version-specific gaps: in megatron-core 0.16 the MoE router references
   ``te_general_gemm`` which is undefined without Transformer Engine, and the
   token dispatcher passes split sizes as tensors, which gloo's ``all_to_all_single``
   rejects.

``enable_cpu_execution()`` is idempotent and does nothing when CUDA is available, so the
same code path runs on GPUs with NCCL untouched. Call it before building any
Megatron-Core object (``mm1_megatron.parallel.setup_distributed`` does).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_state = {"enabled": False, "mode": None}


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

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


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


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device object rather than an ordinal: Megatron mostly passes it as ``device=``,
    # and backward passes run outside the function mode, so it must already be the CPU.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.default_stream = lambda *args, **kwargs: _NoOpStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.set_stream = lambda *args, **kwargs: None
    cuda.get_rng_state = _cpu_get_rng_state
    cuda.set_rng_state = _cpu_set_rng_state
    # torch.manual_seed itself calls cuda.manual_seed_all, so seed the CPU generator
    # directly rather than through torch.manual_seed.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.random.get_rng_state = _cpu_get_rng_state
    cuda.random.set_rng_state = _cpu_set_rng_state
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0
    cuda.memory_stats = lambda *args, **kwargs: {}


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mcore_random

    # The TP RNG tracker forks "CUDA" RNG states; on CPU the CPU generator is the one
    # dropout draws from, so that is the state it must fork.
    mcore_random._get_cuda_rng_state = _cpu_get_rng_state
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state

    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None

    from megatron.core.tensor_parallel import mappings

    original_all_to_all = torch.distributed.all_to_all_single

    def all_to_all_with_list_splits(output, input, output_split_sizes=None,
                                    input_split_sizes=None, group=None, async_op=False):
        # gloo accepts only Python lists for uneven split sizes.
        if hasattr(output_split_sizes, "tolist"):  # tensor or numpy array
            output_split_sizes = output_split_sizes.tolist()
        if hasattr(input_split_sizes, "tolist"):
            input_split_sizes = input_split_sizes.tolist()
        return original_all_to_all(output, input, output_split_sizes, input_split_sizes,
                                   group=group, async_op=async_op)

    mappings.torch.distributed.all_to_all_single = all_to_all_with_list_splits
    _patch_uneven_collectives()


def _pad_rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    padding = tensor.new_zeros((num_rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding]) if padding.shape[0] else tensor.contiguous()


def _patch_uneven_collectives() -> None:
    """gloo needs equal sizes in list all-gather / reduce-scatter; MoE with TP sends uneven
    token counts. Pad every part to the largest, run the even collective, trim."""
    dist = torch.distributed
    even_all_gather, even_reduce_scatter = dist.all_gather, dist.reduce_scatter_tensor

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] if t.dim() else 1 for t in tensor_list]
        if tensor.dim() == 0 or len(set(rows)) == 1 and rows[0] == tensor.shape[0]:
            return even_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        max_rows = max(rows)
        padded = [torch.empty((max_rows, *tensor.shape[1:]), dtype=tensor.dtype)
                  for _ in tensor_list]
        even_all_gather(padded, _pad_rows(tensor, max_rows), group=group)
        for out, part in zip(tensor_list, padded):
            out.copy_(part[:out.shape[0]])
        return None

    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        max_rows = max(t.shape[0] for t in input_list)
        stacked = torch.cat([_pad_rows(t, max_rows) for t in input_list])
        reduced = torch.empty((max_rows, *output.shape[1:]), dtype=output.dtype)
        even_reduce_scatter(reduced, stacked, op=op, group=group)
        output.copy_(reduced[:output.shape[0]])
        return None

    dist.all_gather = all_gather
    dist.reduce_scatter = reduce_scatter


def enable_cpu_execution() -> bool:
    """Install the CPU stand-ins if CUDA is absent. Returns True when they are active."""
    if _state["enabled"]:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    mode = _CudaToCpuMode()
    mode.__enter__()  # stays active for the life of the process (this thread)
    _state.update(enabled=True, mode=mode)
    logger.info("CUDA not available: running Megatron-Core on CPU (gloo backend).")
    return True
