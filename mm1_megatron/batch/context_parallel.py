"""Context parallelism's layout: which tokens of a packed row each context-parallel rank holds.

Two splits, one per attention path:

- The whole-row split (``row_shard``; the local path): the row cut into ``2 x CP`` equal
  chunks, CP rank ``r`` holding chunks ``r`` and ``2 x CP - 1 - r``: Megatron-Core's own
  split (its RoPE slicing, ``get_pos_emb_on_this_cp_rank``, assumes it), exactly balanced
  for a row that is one document, and needing nothing of the data but
  ``seq_length % (2 x CP) == 0``. Activations keep fixed shapes, so pipeline parallelism
  composes with it.
- The per-document split (``padded_document_lengths``, ``rank_positions``; Transformer
  Engine's THD path, laid out by ``document_split``): every document padded to a multiple
  of ``2 x CP`` tokens and cut into ``2 x CP`` equal chunks; CP rank ``r`` holds chunks
  ``r`` and ``2 x CP - 1 - r`` of every document, in row order. Causal attention's work
  grows along a document (token ``p`` attends ``p + 1`` keys), so an early chunk paired
  with its mirror image gives every rank exactly the same work
  (``tests/unit/test_context_parallel.py`` checks the closed form), and cutting each
  document rather than the row keeps that true for rows of documents of any lengths,
  where cutting the row can give one rank the long tail of a long document. It is the
  layout of TE's THD context parallelism (``cu_seqlens_padded``); its price is the
  padding (up to ``2 x CP - 1`` tokens per document) and a row length that varies.

A padded token belongs to its document's tail: causal attention never lets a real token
see it (it comes after every real token of its document), and its label is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch


def check_cp_size(cp_size: int) -> None:
    if cp_size < 1:
        raise ValueError(f"context_parallel_size={cp_size} must be >= 1")


def padded_document_lengths(lengths: Sequence[int], cp_size: int) -> List[int]:
    """Each document length rounded up to a multiple of ``2 x cp_size`` (one rank: as is)."""
    check_cp_size(cp_size)
    if any(length < 1 for length in lengths):
        raise ValueError(f"document lengths must be >= 1, got {list(lengths)}")
    if cp_size == 1:
        return list(lengths)
    step = 2 * cp_size
    return [-(-length // step) * step for length in lengths]


def rank_positions(padded_lengths: Sequence[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """The positions in the padded row that ``cp_rank`` holds, in the order it holds them:
    per document, chunk ``cp_rank`` then chunk ``2 x cp_size - 1 - cp_rank`` (int64)."""
    check_cp_size(cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is not in [0, {cp_size})")
    if cp_size == 1:
        return torch.arange(sum(padded_lengths))
    pieces, start = [], 0
    for length in padded_lengths:
        assert length % (2 * cp_size) == 0, (length, cp_size)
        chunk = length // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            first = start + index * chunk
            pieces.append(torch.arange(first, first + chunk))
        start += length
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def all_rank_positions(padded_lengths: Sequence[int], cp_size: int) -> List[torch.Tensor]:
    return [rank_positions(padded_lengths, cp_size, r) for r in range(cp_size)]


@dataclass(frozen=True)
class PaddedDocuments:
    """The documents of a per-document split (``document_split``), in row order: their
    real lengths and their lengths padded to a multiple of ``2 x CP``."""

    real: Tuple[int, ...]
    padded: Tuple[int, ...]


@dataclass(frozen=True)
class ContextShard:
    """This rank's share of every row of a micro-batch: ``positions`` (host, int64) of the
    whole row, in the order the rank holds them; ``all_positions`` every rank's.
    ``documents``: set for the per-document split (one padded THD row), None for the
    whole-row split."""

    size: int
    rank: int
    seq_length: int
    all_positions: List[torch.Tensor] = field(repr=False, compare=False)
    documents: Optional[PaddedDocuments] = field(default=None, repr=False, compare=False)

    @property
    def positions(self) -> torch.Tensor:
        return self.all_positions[self.rank]

    @property
    def local_length(self) -> int:
        return self.seq_length // self.size

    def take(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of ``tensor`` along ``dim`` (the sequence dimension)."""
        return tensor.index_select(dim, self.positions.to(tensor.device))


def row_shard(seq_length: int, cp_size: int, cp_rank: int) -> ContextShard:
    """The whole-row split of a ``seq_length`` row (module docstring)."""
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"a {seq_length}-token row does not split into 2 x {cp_size} equal chunks; "
            f"training.seq_length must be a multiple of {2 * cp_size}"
        )
    positions = all_rank_positions([seq_length], cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} is not in [0, {cp_size})")
    return ContextShard(cp_size, cp_rank, seq_length, positions)


@dataclass(frozen=True)
class LocalImageTokens:
    """Where a rank's share of a micro-batch needs image tokens (``local_image_tokens``)."""

    images: torch.Tensor  # [k] the images (order of appearance) with a token in the share
    slots: torch.Tensor  # [m, 2] (row, local position) of each image token in the share
    rows: torch.Tensor  # [m] its row in the needed images' tokens, flattened [k * T, h]


def local_image_tokens(
    tokens: torch.Tensor, positions: torch.Tensor, *, image_token_id: int, tokens_per_image: int
) -> LocalImageTokens:
    """Which images a context-parallel rank must encode for its ``positions`` of each row
    of ``tokens`` (``[b, s]``), and where their tokens go. Images are numbered in order of
    appearance (rows in turn), each filling ``tokens_per_image`` consecutive placeholders;
    an image cut by a chunk boundary is needed by both ranks (each backpropagates through
    its own tokens of it; data parallelism's gradient sum over DP x CP adds them)."""
    is_image = tokens == image_token_id
    num_slots = int(is_image.sum())
    if num_slots % tokens_per_image:
        raise ValueError(
            f"batch has {num_slots} image-token positions, not a multiple of the "
            f"{tokens_per_image} tokens each image gives"
        )
    slot_of = is_image.flatten().cumsum(0).view_as(is_image) - 1  # row-major slot index
    positions = positions.to(tokens.device)
    local = is_image.index_select(1, positions)
    slot = slot_of.index_select(1, positions)[local]
    needed, which = torch.unique(slot // tokens_per_image, return_inverse=True)
    return LocalImageTokens(
        images=needed,
        slots=local.nonzero(),
        rows=which * tokens_per_image + slot % tokens_per_image,
    )
