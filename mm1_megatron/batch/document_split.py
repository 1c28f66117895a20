"""Context parallelism's per-document split, for Transformer Engine's THD attention.

TE's context-parallel attention over packed documents (``qkv_format="thd"``) cuts every
document, not the row, into ``2 x CP`` equal chunks, CP rank ``r`` holding chunks ``r`` and
``2 x CP - 1 - r`` of each (``context_parallel.rank_positions``), so every document's
length in its buffer must be a multiple of ``2 x CP``. The data packs documents of any
length, so ``split_documents`` lays a micro-batch out again, on the host:

- its rows become one THD row (Megatron-Core's packed sequences take batch size 1; no
  document crosses a row, so the documents are the same);
- each document is followed by padding to a multiple of ``2 x CP`` (the last one by more
  where sequence parallelism needs the row to split over ``CP x TP``): pad tokens with no
  loss, which TE skips (its ``cu_seqlens`` count each document's real tokens, its
  ``cu_seqlens_padded`` the padded ones) and which no real token attends to;
- each row's source id becomes its tokens' (the per-source losses select tokens).

The padded length varies between micro-batches (by up to ``2 x CP - 1`` tokens per
document), so under pipeline parallelism the stages send each activation's shape first
(Megatron-Core's ``variable_seq_lengths``, ``models/transformer_configs.py``). The local
attention path keeps the whole-row split (``context_parallel``) and fixed shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch

from mm1_megatron.batch.context_parallel import (
    ContextShard,
    PaddedDocuments,
    all_rank_positions,
    padded_document_lengths,
)
from mm1_megatron.batch.documents import compute_segments

Batch = Dict[str, torch.Tensor]

PER_TOKEN_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids")


@dataclass(frozen=True)
class DocumentSplit:
    """How ``model_inputs`` lays out a micro-batch for TE's THD context parallelism."""

    pad_token_id: int  # what padded positions hold (never an image token)
    token_multiple: int  # the padded row's length is a multiple of it (2 x CP, and CP x TP)

    def __post_init__(self):
        if self.token_multiple < 2 or self.token_multiple % 2:
            raise ValueError(f"token_multiple={self.token_multiple} must be even (2 x CP)")


def _documents(document_ids: torch.Tensor) -> List[Tuple[int, int]]:
    """Flat ``[start, end)`` of every document, rows in turn."""
    seq_len = document_ids.shape[1]
    return [
        (row * seq_len + start, row * seq_len + end)
        for row, spans in enumerate(compute_segments(document_ids))
        for start, end in spans
    ]


def padded_layout(
    real: List[int], cp_size: int, token_multiple: int
) -> Tuple[List[int], List[int]]:
    """Each document's padded length, and where each one starts in the padded row."""
    padded = padded_document_lengths(real, cp_size)
    padded[-1] += -sum(padded) % token_multiple
    starts = torch.tensor([0, *padded[:-1]]).cumsum(0).tolist()
    return padded, starts


def split_documents(
    batch: Batch, split: DocumentSplit, cp_size: int, cp_rank: int
) -> Tuple[Batch, ContextShard]:
    """``batch`` (host, ``[b, s]``) as one padded THD row ``[1, T]``, and this rank's share
    of it. Keys other than the per-token ones and ``source_ids`` pass unchanged."""
    if split.token_multiple % (2 * cp_size):
        raise ValueError(
            f"token_multiple={split.token_multiple} is not a multiple of 2 x CP = {2 * cp_size}"
        )
    spans = _documents(batch["document_ids"])
    real = [end - start for start, end in spans]
    padded, starts = padded_layout(real, cp_size, split.token_multiple)
    total = sum(padded)
    source = torch.full((total,), -1, dtype=torch.long)  # flat input index, -1: padding
    document_ids = torch.empty(total, dtype=torch.long)
    for index, ((begin, end), start, length) in enumerate(zip(spans, starts, padded)):
        source[start : start + end - begin] = torch.arange(begin, end)
        document_ids[start : start + length] = index
    is_real = source >= 0
    taken = source.clamp(min=0)
    out = dict(batch)
    fills = {"tokens": split.pad_token_id, "labels": split.pad_token_id, "loss_mask": 0}
    for key in PER_TOKEN_KEYS:
        if key == "document_ids":
            out[key] = document_ids[None]
            continue
        flat = batch[key].reshape(-1)[taken]
        if key == "position_ids":  # padding continues its document's positions
            offset = torch.arange(total) - torch.tensor(starts)[document_ids]
            flat = batch[key].reshape(-1)[[begin for begin, _ in spans]][document_ids] + offset
        else:
            flat = torch.where(is_real, flat, torch.full_like(flat, fills[key]))
        out[key] = flat[None]
    if "source_ids" in batch:
        rows = document_ids.new_tensor([begin // batch["tokens"].shape[1] for begin, _ in spans])
        out["source_ids"] = batch["source_ids"][rows[document_ids]][None]
    shard = ContextShard(
        cp_size,
        cp_rank,
        total,
        all_rank_positions(padded, cp_size),
        documents=PaddedDocuments(real=tuple(real), padded=tuple(padded)),
    )
    return out, shard
