"""Causal attention within documents for one context-parallel rank's queries (local path).

Under context parallelism a rank holds two chunks of every document of a row
(``mm1_megatron.batch.context_parallel``). Its queries need the keys and values of the
whole document up to themselves, most of which other ranks hold; the local path gathers
every rank's keys and values (``parallel.collectives.gather_sequence``, as Llama 3 trained
with context parallelism) and attends here: each contiguous run of local queries (a chunk)
against its document's keys from the document's start to the run's end, a causal mask
aligned to the bottom right. No ``[queries, keys]`` mask is built (SDPA would keep it for
backward, O(s^2) per layer): zero placeholder queries for the keys before the run make it
one square causal SDPA (the flash kernel, on CPU too), whose placeholder rows are
dropped. The price is attention work for those rows, up to about twice the run's own for
a late chunk: this path is the exact reference and the CPU path.

Gathering rather than passing keys around a ring: one collective per layer, and on gloo
(CPU) a ring's many point-to-point steps cost more than their overlap with compute saves.
The gathered keys of one layer are ``CP`` times a rank's own, which is what a ring
avoids, and the reason Transformer Engine's ring is the path on GPUs.

Transformer Engine's path (``thd_packed_seq_params``) takes the per-document split
(``batch.document_split``) as Megatron-Core's packed sequences: the model hands
``PackedSeqParams`` to ``GPTModel``, whose attention applies RoPE per document on this
rank's chunks (``_apply_rotary_pos_emb_thd``) and whose TE attention runs TE's
context-parallel ring over the THD row.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from mm1_megatron.batch.documents import DocumentLayout
from mm1_megatron.parallel.collectives import gather_sequence

Span = Tuple[int, int]


def contiguous_runs(positions: torch.Tensor) -> List[Span]:
    """``[start, end)`` of each run of consecutive positions, in order (local indices)."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().flatten().add(1).tolist()
    bounds = [0, *breaks, positions.numel()]
    return list(zip(bounds[:-1], bounds[1:]))


def document_runs(positions: torch.Tensor, segments: Sequence[Span]) -> List[Tuple[Span, int]]:
    """Each run of consecutive positions cut at document ends: ``((first, end), start)``,
    local indices ``[first, end)`` and the global start of their document. (At CP rank 0
    a document's last chunk and the next one's first are consecutive.)"""
    pieces = []
    for first, end in contiguous_runs(positions):
        while first < end:
            position = int(positions[first])
            document = next((s for s in segments if s[0] <= position < s[1]), None)
            if document is None:
                raise ValueError(f"position {position} is in no document of {list(segments)}")
            stop = min(end, first + document[1] - position)
            pieces.append(((first, stop), document[0]))
            first = stop
    return pieces


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_positions: torch.Tensor,
    segments: Sequence[Sequence[Span]],
    softmax_scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """``[b, heads, sl, d]``: the local queries ``q`` (``[b, heads, sl, d]``, row ``i`` at
    positions ``query_positions[i]`` of the padded row) against the gathered row ``k``,
    ``v`` (``[b, kv_heads, s, d]``), each query seeing the keys of its own document up to
    its own position. ``segments``: per row, the ``[start, end)`` of each document."""
    if q.shape[2] != query_positions.shape[-1]:
        raise ValueError(
            f"{q.shape[2]} local queries but {query_positions.shape[-1]} positions for them"
        )
    grouped = q.shape[1] != k.shape[1]
    rows = []
    for row in range(q.shape[0]):
        positions = query_positions[row]
        pieces = []
        for (first, end), document_start in document_runs(positions, segments[row]):
            last_pos = int(positions[end - 1])
            keys = last_pos + 1 - document_start
            queries = q[row : row + 1, :, first:end]
            earlier = keys - (end - first)  # keys before the run, seen by all its queries
            if earlier:  # placeholder queries for them: a square causal attention
                filler = queries.new_zeros(*queries.shape[:2], earlier, queries.shape[3])
                queries = torch.cat([filler, queries], dim=2)
            context = F.scaled_dot_product_attention(
                queries,
                k[row : row + 1, :, document_start : last_pos + 1],
                v[row : row + 1, :, document_start : last_pos + 1],
                dropout_p=dropout,
                is_causal=True,
                scale=softmax_scale,
                enable_gqa=grouped,
            )
            pieces.append(context[:, :, earlier:])
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def attend_context_parallel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: DocumentLayout,
    *,
    group,
    softmax_scale: float,
    dropout: float,
) -> torch.Tensor:
    """Megatron's layout, ``[s_local, b, heads, d]`` in and ``[s_local, b, heads * d]``
    out: this rank's queries (its share ``layout.context`` of every row) against every
    rank's keys and values, gathered over the context-parallel ``group``."""
    shard = layout.context
    if query.shape[0] != shard.local_length:
        raise ValueError(
            f"{query.shape[0]} local positions, but a {shard.size}-way share of "
            f"{shard.seq_length}-token rows is {shard.local_length}"
        )
    device = query.device
    positions = [p.to(device) for p in shard.all_positions]
    key, value = (gather_sequence(t, dim=0, positions=positions, group=group) for t in (key, value))
    # [s, b, heads, d] -> [b, heads, s, d]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    # The host copy: the runs are read from it without a device sync per layer.
    rows = shard.positions.expand(q.shape[0], -1)
    context = context_parallel_attention(
        q,
        k,
        v,
        query_positions=rows,
        segments=layout.segments,
        softmax_scale=softmax_scale,
        dropout=dropout,
    )
    return context.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def thd_packed_seq_params(layout: DocumentLayout, device):
    """Megatron-Core's ``PackedSeqParams`` for a per-document split: the documents' real
    lengths (``cu_seqlens``) and padded ones (``cu_seqlens_padded``), over the whole THD
    row, as TE's context parallelism takes them; the longest padded document sizes RoPE's
    table. The padded ones are the layout's own spans (the ids cover each document's
    padding), already on the device; only the real ones are copied."""
    from megatron.core.packed_seq_params import PackedSeqParams

    documents = layout.context.documents
    assert documents is not None, "the whole-row split has no THD form"
    assert layout.max_seqlen == max(documents.padded), (layout.max_seqlen, documents)
    host = torch.tensor([0, *documents.real], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if torch.device(device).type == "cuda":  # one copy the host need not wait for
        host = host.pin_memory()
    real, padded = host.to(device, non_blocking=True), layout.cu_seqlens
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=real,
        cu_seqlens_kv=real,
        cu_seqlens_q_padded=padded,
        cu_seqlens_kv_padded=padded,
        max_seqlen_q=layout.max_seqlen,
        max_seqlen_kv=layout.max_seqlen,
    )
