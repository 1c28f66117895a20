"""Context parallelism's local attention on two gloo ranks: each rank holds its chunks of a
packed row's queries, keys and values, gathers the keys and values (``gather_sequence``)
and attends; the outputs and every share's gradient equal one process' dense-mask
attention over the whole row. The job below runs on the session's rank pool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mm1_megatron.batch.context_parallel import all_rank_positions, padded_document_lengths
from mm1_megatron.models.context_attention import context_parallel_attention
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
