"""``batch.document_split``: a ``[b, s]`` micro-batch laid out as one padded THD row for
Transformer Engine's context parallelism, checked by rebuilding the input from every
rank's share, and ``model_inputs`` handing each rank its share."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch import DocumentSplit
from mm1_megatron.batch.context_parallel import padded_document_lengths
from mm1_megatron.batch.document_split import split_documents

PAD = 0
IMAGE = 99


def _batch():
    """Two rows of 12: documents of 5, 4, 3 tokens, then 7 and 5; position ids restart
    per document, as the packers write them."""
    ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5])
    positions = torch.cat([torch.arange(n) for n in (5, 4, 3, 7, 5)]).view(2, 12)
    tokens = torch.arange(1, 25).view(2, 12)
    tokens[0, 1:3] = IMAGE
    return {
        "tokens": tokens,
        "labels": tokens + 100,
        "loss_mask": torch.ones(2, 12),
        "position_ids": positions,
        "document_ids": ids,
        "images": torch.zeros(1, 3, 4, 4),
        "source_ids": torch.tensor([3, 5]),
    }


def _rebuilt(shares, cp_size, shard_of):
    """The padded row from every rank's share of it."""
    total = shard_of(0).seq_length
    row = torch.empty(total, dtype=shares[0].dtype)
    for rank, share in enumerate(shares):
        row[shard_of(rank).positions] = share[0]
    return row


@pytest.mark.parametrize("cp_size, multiple", [(2, 4), (2, 8), (3, 6)])
def test_the_padded_row_holds_every_real_token_once_in_order(cp_size, multiple):
    batch = _batch()
    split = DocumentSplit(pad_token_id=PAD, token_multiple=multiple)
    outs = [split_documents(batch, split, cp_size, rank) for rank in range(cp_size)]
    out, shard = outs[0]
    real, padded = shard.documents.real, shard.documents.padded
    assert real == (5, 4, 3, 7, 5)
    assert all(p % (2 * cp_size) == 0 and p >= r for p, r in zip(padded, real))
    assert sum(padded) % multiple == 0 and shard.seq_length == sum(padded)
    # Only the last document pads beyond 2 x CP, and by less than the multiple.
    assert list(padded[:-1]) == padded_document_lengths(real[:-1], cp_size)
    assert 0 <= padded[-1] - padded_document_lengths(real[-1:], cp_size)[0] < multiple
    tokens = out["tokens"][0]
    is_real = out["loss_mask"][0] > 0
    assert tokens[is_real].tolist() == batch["tokens"].flatten().tolist()
    assert out["labels"][0][is_real].tolist() == batch["labels"].flatten().tolist()
    assert (tokens[~is_real] == PAD).all() and (out["labels"][0][~is_real] == PAD).all()
    # Every document keeps its tokens, then its padding, under one id; positions run on.
    starts = torch.tensor([0, *padded]).cumsum(0).tolist()
    for index, (start, length, n) in enumerate(zip(starts, padded, real)):
        assert (out["document_ids"][0, start : start + length] == index).all()
        assert is_real[start : start + n].all() and not is_real[start + n : start + length].any()
        assert out["position_ids"][0, start : start + length].tolist() == list(range(length))
    assert out["source_ids"][0].tolist() == sum(
        ([source] * p for source, p in zip([3, 3, 3, 5, 5], padded)), []
    )
    assert out["images"] is batch["images"]
    # The ranks' shares are disjoint, equal in size, and rebuild the row.
    shards = [shard for _, shard in outs]
    assert len({s.local_length for s in shards}) == 1
    shares = [s.take(out["tokens"]) for s in shards]
    assert torch.equal(_rebuilt(shares, cp_size, lambda r: shards[r]), tokens)


def test_image_placeholders_keep_their_count_and_order():
    out, _ = split_documents(_batch(), DocumentSplit(PAD, 4), 2, 0)
    assert int((out["tokens"] == IMAGE).sum()) == 2
    assert out["tokens"][0, 1:3].tolist() == [IMAGE, IMAGE]


def test_refusals():
    with pytest.raises(ValueError, match="must be even"):
        DocumentSplit(PAD, 3)
    with pytest.raises(ValueError, match="not a multiple of 2 x CP = 6"):
        split_documents(_batch(), DocumentSplit(PAD, 4), 3, 0)


def test_model_inputs_hands_each_rank_its_share(monkeypatch):
    import importlib

    from mm1_megatron.batch import model_inputs
    from mm1_megatron.batch.documents import document_layout

    # The module (the package's ``model_inputs`` is the function).
    inputs_module = importlib.import_module("mm1_megatron.batch.model_inputs")
    split = DocumentSplit(PAD, 4)
    monkeypatch.setattr(inputs_module, "_context_parallel_rank", lambda: (2, 1))
    batch = _batch()
    inputs = model_inputs(batch, torch.device("cpu"), documents=split)
    expected, shard = split_documents(batch, split, 2, 1)
    assert torch.equal(inputs["tokens"], expected["tokens"])  # whole: the embedding picks
    assert torch.equal(inputs["document_ids"], expected["document_ids"])
    for key in ("labels", "loss_mask", "position_ids", "source_ids"):
        assert torch.equal(inputs[key], shard.take(expected[key])), key
    layout = document_layout(inputs["document_ids"])
    assert layout.context.documents == shard.documents
    assert layout.context.positions.tolist() == shard.positions.tolist()
    # Without a document split the same rank takes its whole-row share.
    plain = model_inputs(batch, torch.device("cpu"))
    assert plain["labels"].shape == (2, 6)


@pytest.mark.parametrize(
    "overrides, multiple",
    [
        ([], 4),  # 2 x CP
        (["parallel.tensor_parallel_size=4", "parallel.sequence_parallel=true"], 8),  # CP x TP
        # FP8: each rank's tokens (per TP rank with SP) a multiple of 16.
        (["model.fp8=hybrid", "training.precision=bf16"], 32),
        (
            [
                "model.fp8=hybrid",
                "training.precision=bf16",
                "parallel.tensor_parallel_size=2",
                "parallel.sequence_parallel=true",
            ],
            64,
        ),
    ],
)
def test_the_run_s_token_multiple(overrides, multiple):
    from mm1_megatron.config import load_config
    from mm1_megatron.config.context_parallel_checks import thd_token_multiple
    from tests.conftest import DEBUG_CONFIG

    te = ["parallel.context_parallel_size=2", "model.transformer_impl=transformer_engine"]
    assert thd_token_multiple(load_config(DEBUG_CONFIG, te + overrides)) == multiple
