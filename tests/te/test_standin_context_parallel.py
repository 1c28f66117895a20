"""The stand-in's THD context parallelism (TE's ``p2p`` contract) on two gloo ranks: each
rank passes its share of a THD batch whose sequences carry padding (real lengths in
``cu_seqlens``, padded ones in ``cu_seqlens_padded``), laid out by our
``batch.context_parallel.rank_positions``; outputs and gradients equal one process' dense
per-document causal attention over the real tokens, and padded queries give zeros. What
the model's Transformer Engine path under context parallelism relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.te.conftest import SKIP_REASON, TE_MODE

if TE_MODE != "standin":  # real TE needs CUDA and NCCL for this; the model tests cover it
    pytest.skip(SKIP_REASON + " (stand-in only)", allow_module_level=True)

from mm1_megatron.batch.context_parallel import all_rank_positions, padded_document_lengths  # noqa: E402
from tests.unit.test_context_parallel import _document_causal_reference  # noqa: E402

pytestmark = pytest.mark.slow  # a pool of two ranks

CP = 2
REAL = [13, 2, 29, 6]
PADDED = padded_document_lengths(REAL, CP)
HEADS, KV_HEADS, DIM = 4, 2, 8


def _cumulated(lengths):
    return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _real_positions():
    """Where each real token lies in the padded THD buffer."""
    starts = _cumulated(PADDED).tolist()
    return torch.cat([torch.arange(s, s + n) for s, n in zip(starts, REAL)])


def _inputs():
    generator = torch.Generator().manual_seed(11)
    total = sum(PADDED)

    def draw(heads):
        return torch.randn(total, heads, DIM, dtype=torch.float64, generator=generator)

    return draw(HEADS), draw(KV_HEADS), draw(KV_HEADS), draw(HEADS)


def attend_on_this_rank(folder: str) -> None:
    import torch.distributed as dist
    from transformer_engine.pytorch import DotProductAttention

    from mm1_megatron.config.schema import ParallelConfig
    from mm1_megatron.parallel import init_distributed

    init_distributed(ParallelConfig())
    rank = int(os.environ["RANK"])
    mine = all_rank_positions(PADDED, CP)[rank]
    q, k, v, weights = _inputs()
    shares = [t[mine].clone().requires_grad_() for t in (q, k, v)]
    attention = DotProductAttention(
        HEADS,
        DIM,
        num_gqa_groups=KV_HEADS,
        qkv_format="thd",
        attn_mask_type="padding_causal",
        cp_group=dist.group.WORLD,
        cp_global_ranks=list(range(CP)),
        cp_comm_type="p2p",
    )
    out = attention(
        *shares,
        cu_seqlens_q=_cumulated(REAL),
        cu_seqlens_kv=_cumulated(REAL),
        cu_seqlens_q_padded=_cumulated(PADDED),
        cu_seqlens_kv_padded=_cumulated(PADDED),
        max_seqlen_q=max(PADDED),
        max_seqlen_kv=max(PADDED),
    )
    (out * weights[mine].reshape(out.shape)).sum().backward()
    result = {"out": out.detach(), "grads": [share.grad for share in shares]}
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def test_two_ranks_equal_one_process_over_real_tokens(tmp_path):
    from tests.rank_pool import session_pools

    session_pools()(CP).run(f"{__name__}:attend_on_this_rank", str(tmp_path))

    q, k, v, weights = _inputs()
    real = _real_positions()
    compact = [t[real][None].transpose(1, 2).requires_grad_() for t in (q, k, v)]
    reference = _document_causal_reference(*compact, REAL, DIM**-0.5)  # [1, h, n, d]
    reference = reference[0].transpose(0, 1)  # [n, h, d]
    (reference * weights[real]).sum().backward()
    expected_out = torch.zeros(sum(PADDED), HEADS, DIM, dtype=torch.float64)
    expected_out[real] = reference.detach()
    expected_grads = []
    for tensor in compact:
        grad = torch.zeros(sum(PADDED), tensor.shape[1], DIM, dtype=torch.float64)
        grad[real] = tensor.grad[0].transpose(0, 1)
        expected_grads.append(grad)

    for rank, mine in enumerate(all_rank_positions(PADDED, CP)):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["out"], expected_out[mine].reshape(got["out"].shape))
        for grad, expected in zip(got["grads"], expected_grads):
            torch.testing.assert_close(grad, expected[mine])
    assert not torch.equal(expected_out[real], torch.zeros_like(expected_out[real]))


def test_a_padded_length_that_does_not_split_is_refused():
    from transformer_engine.pytorch.attention.context_parallel import held_positions

    with pytest.raises(AssertionError, match="does not split into 2 x 2 chunks"):
        held_positions([0, 8, 14], 2, 0)
    assert held_positions([0, 8, 12], 2, 1) == [2, 3, 4, 5, 9, 10]
