"""TE's THD context parallelism (``cp_comm_type="p2p"``) as its contract, not its ring.

TE v2.14 ``attention/dot_product_attention/context_parallel.py`` (``AttnFuncWithCPAndKVP2P``)
takes, on each rank of ``cp_group``, its share of every sequence of a THD batch:

- ``cu_seqlens_{q,kv}``: the sequences' real lengths, cumulated over the *whole* batch
  (every rank passes the same tensors);
- ``cu_seqlens_{q,kv}_padded``: their padded lengths, cumulated the same way; each padded
  length is a multiple of ``2 x cp_size`` (TE divides both by ``cp_size`` for the local
  offsets, and the local share of a sequence by 2 for its two halves);
- q, k, v ``[t_local, heads, d]``: per sequence, in order, chunk ``rank`` then chunk
  ``2 x cp_size - 1 - rank`` of its ``2 x cp_size`` equal chunks of the padded length.

It passes keys and values around a ring and merges partial softmaxes. The stand-in computes
the same function directly: it gathers every rank's keys and values (backward: the sum of
every rank's gradient at this rank's positions), places them at their global padded
positions, and attends each local query to the real keys of its own sequence (causal:
those up to its own position). A padded query's output is zero.
"""

from typing import List, Sequence

import torch
import torch.distributed as dist


class _GatherAll(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums every rank's gradient of its piece."""

    @staticmethod
    def forward(ctx, local, group):
        pieces = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, local.contiguous(), group=group)
        ctx.group, ctx.rank, ctx.size = group, dist.get_rank(group), local.shape[0]
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size], None


def held_positions(cu_padded: Sequence[int], cp_size: int, rank: int) -> List[int]:
    """Global padded positions that ``rank`` holds, in its local order."""
    held = []
    for start, end in zip(cu_padded[:-1], cu_padded[1:]):
        length = end - start
        assert length % (2 * cp_size) == 0, (
            f"a padded sequence of {length} tokens does not split into 2 x {cp_size} chunks"
        )
        chunk = length // (2 * cp_size)
        for index in (rank, 2 * cp_size - 1 - rank):
            held.extend(range(start + index * chunk, start + (index + 1) * chunk))
    return held


def thd_context_parallel(
    q, k, v, *, causal, cu_q, cu_kv, cu_q_padded, cu_kv_padded, group, sdpa
) -> torch.Tensor:
    """``[t_local, heads, d]`` -> ``[t_local, heads * d_v]`` (module docstring)."""
    assert torch.equal(cu_q, cu_kv) and torch.equal(cu_q_padded, cu_kv_padded), (
        "the stand-in's context parallelism is self-attention (same q and kv sequences)"
    )
    cp_size, rank = dist.get_world_size(group), dist.get_rank(group)
    bounds, padded = cu_q.tolist(), cu_q_padded.tolist()
    assert len(bounds) == len(padded) and padded[-1] == q.shape[0] * cp_size, (
        f"cu_seqlens_padded ends at {padded[-1]}, the ranks hold {q.shape[0] * cp_size} tokens"
    )
    everyone = [held_positions(padded, cp_size, r) for r in range(cp_size)]
    order = torch.tensor([p for held in everyone for p in held], device=q.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=q.device)
    keys, values = (_GatherAll.apply(t, group).index_select(0, inverse) for t in (k, v))
    local = torch.tensor(everyone[rank], device=q.device)
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for i in range(len(bounds) - 1):
        start, real = padded[i], bounds[i + 1] - bounds[i]
        mine = ((local >= start) & (local < start + real)).nonzero().flatten()
        if mine.numel() == 0:
            continue
        offsets = local[mine] - start  # the queries' positions in their sequence
        allowed = torch.ones(mine.numel(), real, dtype=torch.bool, device=q.device)
        if causal:
            allowed = torch.arange(real, device=q.device)[None, :] <= offsets[:, None]
        qi = q.index_select(0, mine).transpose(0, 1)[None]
        ki, vi = (t[start : start + real].transpose(0, 1)[None] for t in (keys, values))
        context = sdpa(qi, ki, vi, allowed)[0].transpose(0, 1)
        out = out.index_copy(0, mine, context)
    return out.reshape(out.shape[0], -1)
