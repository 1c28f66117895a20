"""Context parallelism's building blocks against closed forms and one-process attention:
the per-document ``2 x CP`` chunk layout (``batch/context_parallel.py``) and the local
path's attention of a rank's queries against the gathered row
(``models/context_attention.py``)."""

from __future__ import annotations

from typing import Sequence

import pytest
import torch

from mm1_megatron.batch.context_parallel import (
    all_rank_positions,
    padded_document_lengths,
    rank_positions,
)
from mm1_megatron.models.context_attention import (
    context_parallel_attention,
    contiguous_runs,
    document_runs,
)
from mm1_megatron.parallel.collectives import gather_sequence


def test_documents_are_padded_to_twice_cp():
    assert padded_document_lengths([5, 12, 7, 1], 2) == [8, 12, 8, 4]
    assert padded_document_lengths([5, 12, 7], 3) == [6, 12, 12]
    assert padded_document_lengths([5, 12], 1) == [5, 12]
    with pytest.raises(ValueError, match="context_parallel_size=0"):
        padded_document_lengths([4], 0)
    with pytest.raises(ValueError, match="document lengths must be >= 1"):
        padded_document_lengths([4, 0], 2)


def test_rank_holds_chunk_r_and_its_mirror_of_every_document():
    # Documents of 8 and 4 tokens at CP=2: chunks of 2 and 1.
    assert rank_positions([8, 4], 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert rank_positions([8, 4], 2, 1).tolist() == [2, 3, 4, 5, 9, 10]
    assert rank_positions([5, 3], 1, 0).tolist() == list(range(8))
    with pytest.raises(ValueError, match="cp_rank=2 is not in"):
        rank_positions([8], 2, 2)


def _rank_work(padded_lengths: Sequence[int], cp_size: int, cp_rank: int) -> int:
    """Query-key pairs of causal attention within documents for ``cp_rank``'s tokens."""
    positions = rank_positions(padded_lengths, cp_size, cp_rank)
    starts = torch.repeat_interleave(
        torch.tensor([0, *padded_lengths[:-1]]).cumsum(0), torch.tensor(list(padded_lengths))
    )
    return int((positions - starts[positions] + 1).sum())


@pytest.mark.parametrize("cp_size", [2, 3, 4])
def test_ranks_cover_the_row_once_and_do_equal_causal_work(cp_size):
    lengths = padded_document_lengths([37, 5, 120, 16, 1], cp_size)
    positions = all_rank_positions(lengths, cp_size)
    assert torch.cat(positions).sort().values.tolist() == list(range(sum(lengths)))
    assert len({p.numel() for p in positions}) == 1
    # Each document of 2 x CP chunks of m tokens: chunks r and 2CP-1-r hold
    # m^2 (2CP - 1) + m (m + 1) query-key pairs whatever r is.
    expected = 0
    for length in lengths:
        m = length // (2 * cp_size)
        expected += m * m * (2 * cp_size - 1) + m * (m + 1)
    assert [_rank_work(lengths, cp_size, r) for r in range(cp_size)] == [expected] * cp_size


def test_contiguous_runs():
    assert contiguous_runs(torch.tensor([0, 1, 6, 7, 8, 11])) == [(0, 2), (2, 5), (5, 6)]
    assert contiguous_runs(torch.tensor([], dtype=torch.long)) == []


def _document_causal_reference(q, k, v, lengths, scale):
    """Dense ``[s, s]`` mask: same document and key at or before the query."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    where = torch.arange(ids.numel())
    mask = (ids[:, None] == ids[None, :]) & (where[None, :] <= where[:, None])
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def _segments(lengths):
    starts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    return list(zip(starts[:-1], starts[1:]))


@pytest.mark.parametrize("cp_size, heads, kv_heads", [(2, 4, 4), (2, 4, 2), (3, 2, 1)])
def test_local_cp_attention_equals_one_process_with_gradients(cp_size, heads, kv_heads):
    """Two rows with different documents; every rank's output and the gradients the ranks'
    losses give the whole row equal one process' dense-mask attention."""
    torch.manual_seed(0)
    rows = [padded_document_lengths(d, cp_size) for d in ([9, 30, 3], [17, 2, 20])]
    total = sum(rows[0])
    rows[1][-1] += total - sum(rows[1])  # both rows as long (the last document's tail)
    assert sum(rows[1]) == total and rows[1][-1] % (2 * cp_size) == 0
    d, scale = 8, 8**-0.5
    q = torch.randn(2, heads, total, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, kv_heads, total, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, kv_heads, total, d, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, heads, total, d, dtype=torch.float64)

    reference = torch.cat(
        [
            _document_causal_reference(q[i : i + 1], k[i : i + 1], v[i : i + 1], rows[i], scale)
            for i in range(2)
        ]
    )
    (reference * weights).sum().backward()
    expected_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    loss = 0
    for rank in range(cp_size):
        positions = torch.stack([rank_positions(lengths, cp_size, rank) for lengths in rows])
        local_q = torch.stack([q[i][:, positions[i]] for i in range(2)])
        out = context_parallel_attention(
            local_q,
            k,
            v,
            query_positions=positions,
            segments=[_segments(lengths) for lengths in rows],
            softmax_scale=scale,
        )
        for i in range(2):
            torch.testing.assert_close(
                out[i], reference[i][:, positions[i]], rtol=1e-12, atol=1e-12
            )
            loss = loss + (out[i] * weights[i][:, positions[i]]).sum()
    loss.backward()
    for got, want in zip((q.grad, k.grad, v.grad), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_runs_are_cut_at_document_ends():
    # CP rank 0 of documents of 8 and 4 tokens: [0, 1] | [6, 7] then [8] (next document) | [11]
    positions = rank_positions([8, 4], 2, 0)
    assert document_runs(positions, [(0, 8), (8, 12)]) == [
        ((0, 2), 0), ((2, 4), 0), ((4, 5), 8), ((5, 6), 8)
    ]  # fmt: skip
    with pytest.raises(ValueError, match="position 11 is in no document"):
        document_runs(positions, [(0, 8), (8, 11)])


def test_gather_sequence_without_a_process_group_places_the_share():
    local = torch.arange(6.0).reshape(1, 3, 2).requires_grad_()
    whole = gather_sequence(local, dim=1, positions=[torch.tensor([2, 0, 1])])
    assert whole[0, :, 0].tolist() == [2.0, 4.0, 0.0]
    (whole * torch.arange(3.0)[None, :, None]).sum().backward()
    assert local.grad[0, :, 0].tolist() == [2.0, 0.0, 1.0]
