"""Collectives Megatron-Core issues in forms gloo does not accept (CPU runs only).

- The MoE token dispatcher passes ``all_to_all_single`` split sizes as tensors or NumPy
  arrays; gloo takes only Python lists.
- MoE with tensor parallelism gathers and reduce-scatters uneven token counts with the
  list forms ``all_gather`` / ``reduce_scatter``; gloo needs equal sizes. The stand-ins
  pad every part to the largest, run the even collective and trim.

Asynchronous calls pass through where the original collective serves them; the padded
(uneven) path is synchronous, so it refuses ``async_op=True`` rather than returning a
handle that was never waited on (Megatron-Core 0.16.1 and 0.19.2 call it synchronously).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mm1_megatron.compat.patching import replace_attribute

_WRITTEN_FOR = "torch 2.10-2.13 gloo, megatron-core 0.16.1-0.19.2"


def _as_list(split_sizes):
    return split_sizes.tolist() if hasattr(split_sizes, "tolist") else split_sizes


def _pad_rows(tensor: torch.Tensor, num_rows: int) -> torch.Tensor:
    padding = tensor.new_zeros((num_rows - tensor.shape[0], *tensor.shape[1:]))
    return torch.cat([tensor, padding]) if padding.shape[0] else tensor.contiguous()


def _refuse_async(name: str, async_op: bool) -> None:
    if async_op:
        raise NotImplementedError(
            f"the gloo stand-in for uneven {name} is synchronous; async_op=True is not "
            "supported on CPU (mm1_megatron/compat/gloo.py)"
        )


def _all_to_all_with_list_splits(original):
    def all_to_all_single(
        output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False
    ):
        return original(
            output,
            input,
            _as_list(output_split_sizes),
            _as_list(input_split_sizes),
            group=group,
            async_op=async_op,
        )

    return all_to_all_single


def _uneven_all_gather(even_all_gather):
    def all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] if t.dim() else 1 for t in tensor_list]
        if tensor.dim() == 0 or len(set(rows)) == 1 and rows[0] == tensor.shape[0]:
            return even_all_gather(tensor_list, tensor, group=group, async_op=async_op)
        _refuse_async("all_gather", async_op)
        max_rows = max(rows)
        padded = [
            torch.empty((max_rows, *tensor.shape[1:]), dtype=tensor.dtype) for _ in tensor_list
        ]
        even_all_gather(padded, _pad_rows(tensor, max_rows), group=group)
        for out, part in zip(tensor_list, padded):
            out.copy_(part[: out.shape[0]])
        return None

    return all_gather


def _uneven_reduce_scatter(even_reduce_scatter_tensor):
    def reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
        _refuse_async("reduce_scatter", async_op)
        max_rows = max(t.shape[0] for t in input_list)
        stacked = torch.cat([_pad_rows(t, max_rows) for t in input_list])
        reduced = torch.empty((max_rows, *output.shape[1:]), dtype=output.dtype)
        even_reduce_scatter_tensor(reduced, stacked, op=op, group=group)
        output.copy_(reduced[: output.shape[0]])
        return None

    return reduce_scatter


def patch_collectives_for_gloo() -> None:
    original = dist.all_to_all_single
    replace_attribute(
        dist,
        "all_to_all_single",
        _all_to_all_with_list_splits(original),
        reason="gloo takes all_to_all split sizes only as lists",
        written_for=_WRITTEN_FOR,
        scope="cpu",
    )
    replace_attribute(
        dist,
        "all_gather",
        _uneven_all_gather(dist.all_gather),
        reason="gloo all_gather needs equal sizes (MoE with TP)",
        written_for=_WRITTEN_FOR,
        scope="cpu",
    )
    replace_attribute(
        dist,
        "reduce_scatter",
        _uneven_reduce_scatter(dist.reduce_scatter_tensor),
        reason="gloo has no list reduce_scatter of uneven sizes (MoE with TP)",
        written_for=_WRITTEN_FOR,
        scope="cpu",
    )
