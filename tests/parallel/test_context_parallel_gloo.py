"""Context parallelism's local attention on two gloo ranks: each rank holds its chunks of a
packed row's queries, keys and values, gathers the keys and values (``gather_sequence``)
and attends; the outputs and every share's gradient equal one process' dense-mask
attention over the whole row. Then training's form of it (``attend_context_parallel``,
Megatron's layout, the whole-row split of documents that cross chunk boundaries): no
query's output depends on another document's keys or values. The jobs below run on the
session's rank pool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mm1_megatron.batch.context_parallel import (
    all_rank_positions,
    padded_document_lengths,
    row_shard,
)
from mm1_megatron.models.context_attention import (
    attend_context_parallel,
    context_parallel_attention,
)
from mm1_megatron.parallel.collectives import gather_sequence
from tests.unit.test_context_parallel import _document_causal_reference, _segments

pytestmark = pytest.mark.slow  # a pool of two ranks

CP = 2
LENGTHS = padded_document_lengths([13, 2, 29, 6], CP)
HEADS, KV_HEADS, DIM = 4, 2, 8
SCALE = DIM**-0.5


def _inputs():
    generator = torch.Generator().manual_seed(7)
    total = sum(LENGTHS)

    def draw(heads):
        return torch.randn(1, heads, total, DIM, dtype=torch.float64, generator=generator)

    return draw(HEADS), draw(KV_HEADS), draw(KV_HEADS), draw(HEADS)


def attend_on_this_rank(folder: str) -> None:
    """The job: this rank's shares in, its output and its shares' gradients out."""
    from mm1_megatron.config.schema import ParallelConfig
    from mm1_megatron.parallel import init_distributed

    init_distributed(ParallelConfig())
    rank = int(os.environ["RANK"])
    positions = all_rank_positions(LENGTHS, CP)
    mine = positions[rank]
    q, k, v, weights = _inputs()
    shares = [t[:, :, mine].clone().requires_grad_() for t in (q, k, v)]
    whole_k = gather_sequence(shares[1], dim=2, positions=positions)
    whole_v = gather_sequence(shares[2], dim=2, positions=positions)
    out = context_parallel_attention(
        shares[0],
        whole_k,
        whole_v,
        query_positions=mine[None],
        segments=[_segments(LENGTHS)],
        softmax_scale=SCALE,
    )
    (out * weights[:, :, mine]).sum().backward()
    grads = [share.grad for share in shares]
    torch.save({"out": out.detach(), "grads": grads}, Path(folder) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process(tmp_path):
    from tests.rank_pool import session_pools

    session_pools()(CP).run(f"{__name__}:attend_on_this_rank", str(tmp_path))

    q, k, v, weights = (t.requires_grad_() for t in _inputs())
    reference = _document_causal_reference(q, k, v, LENGTHS, SCALE)
    (reference * weights).sum().backward()
    for rank, mine in enumerate(all_rank_positions(LENGTHS, CP)):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(result["out"], reference[:, :, mine], rtol=1e-12, atol=1e-12)
        for got, full in zip(result["grads"], (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(got, full[:, :, mine], rtol=1e-10, atol=1e-12)


# A row of 24 tokens in 4 chunks of 6 (CP=2): document 1 (positions 5-15) crosses two chunk
# boundaries, so both ranks hold part of it, and rank 0's two chunks end and start inside
# documents.
ROW_LENGTHS = [5, 11, 2, 6]
WATCHED = 1  # the document whose outputs are differentiated


def _row_inputs():
    generator = torch.Generator().manual_seed(11)
    total = sum(ROW_LENGTHS)
    # Megatron's layout: [s, b, heads, d]
    return [
        torch.randn(total, 1, heads, DIM, dtype=torch.float64, generator=generator)
        for heads in (HEADS, KV_HEADS, KV_HEADS)
    ]


def attend_row_on_this_rank(folder: str) -> None:
    """The job: training's CP attention on this rank's share; the gradients of the watched
    document's outputs with respect to this rank's shares."""
    from mm1_megatron.batch.documents import register_host_document_ids
    from mm1_megatron.config.schema import ParallelConfig
    from mm1_megatron.parallel import init_distributed

    init_distributed(ParallelConfig())
    rank = int(os.environ["RANK"])
    shard = row_shard(sum(ROW_LENGTHS), CP, rank)
    ids = torch.repeat_interleave(torch.arange(len(ROW_LENGTHS)), torch.tensor(ROW_LENGTHS))
    layout = register_host_document_ids(ids[None].clone(), ids[None], shard)
    shares = [t[shard.positions].clone().requires_grad_() for t in _row_inputs()]
    out = attend_context_parallel(*shares, layout, group=None, softmax_scale=SCALE, dropout=0.0)
    watched = ids[shard.positions] == WATCHED
    out[watched].sum().backward()
    grads = [share.grad for share in shares]
    torch.save({"out": out.detach(), "grads": grads}, Path(folder) / f"row{rank}.pt")


def test_training_attention_never_crosses_a_document_boundary(tmp_path):
    from tests.rank_pool import session_pools

    session_pools()(CP).run(f"{__name__}:attend_row_on_this_rank", str(tmp_path))

    q, k, v = (t.permute(1, 2, 0, 3) for t in _row_inputs())  # [b, heads, s, d]
    reference = _document_causal_reference(q, k, v, ROW_LENGTHS, SCALE)
    reference = reference.permute(2, 0, 1, 3).reshape(sum(ROW_LENGTHS), 1, -1)
    ids = torch.repeat_interleave(torch.arange(len(ROW_LENGTHS)), torch.tensor(ROW_LENGTHS))
    total = sum(ROW_LENGTHS)
    whole_grads = [
        torch.zeros(total, 1, h, DIM, dtype=torch.float64) for h in (HEADS, KV_HEADS, KV_HEADS)
    ]
    for rank in range(CP):
        mine = row_shard(total, CP, rank).positions
        result = torch.load(tmp_path / f"row{rank}.pt")
        torch.testing.assert_close(result["out"], reference[mine], rtol=1e-12, atol=1e-12)
        for whole, got in zip(whole_grads, result["grads"]):
            whole[mine] = got
    elsewhere = ids != WATCHED
    for name, grad in zip("qkv", whole_grads):
        assert torch.count_nonzero(grad[elsewhere]) == 0, f"d out / d {name} outside the document"
        assert torch.count_nonzero(grad[~elsewhere]) > 0, name
