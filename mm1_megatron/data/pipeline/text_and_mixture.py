"""The text source (chunks of an indexed corpus) and ``MixtureBuilder``, which serves
global sequence ``g`` from the source the mixture schedule picks (``mixture.py``).

Text: chunk ``k`` of ``TextCorpus``; a document cut at a chunk boundary continues in the
next chunk as a document of its own; token ids outside the vocabulary drop their document
(counted as ``bad_text``, logged once per process).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from mm1_megatron.data.pipeline.balance import SequenceCost
from mm1_megatron.data.pipeline.mixture import MixtureSchedule
from mm1_megatron.data.pipeline.packing import PackedSequence, assemble, documents_cost
from mm1_megatron.data.shards.skips import BadSample, DataStats, SkipVerdicts
from mm1_megatron.data.shards.text_index import TextCorpus
from mm1_megatron.data.tokenizers.base import Tokenizer


class TextSource:
    """Chunks of indexed text; token ids outside the vocabulary drop their piece."""

    name = "text"

    def __init__(
        self,
        corpus: TextCorpus,
        *,
        tokenizer: Tokenizer,
        seq_length: int,
        empty_images: torch.Tensor,
        empty_grids: Optional[torch.Tensor] = None,
    ):
        """``empty_images`` (and at native resolution ``empty_grids``): a sequence's
        images, as the image sources' decoder gives none."""
        self.corpus, self.tokenizer, self.seq_length = corpus, tokenizer, seq_length
        self.empty_images, self.empty_grids = empty_images, empty_grids
        self._dropped = np.array([tokenizer.image_token_id, tokenizer.pad_token_id])
        self.verdicts = SkipVerdicts()  # documents already logged by this process

    def sequence(self, index: int) -> Tuple[PackedSequence, DataStats]:
        stats = DataStats()
        return assemble(
            self._documents(index, stats),
            source="text",
            seq_length=self.seq_length,
            tokenizer=self.tokenizer,
            images=self.empty_images,
            image_grids=self.empty_grids,
        ), stats

    def sequence_cost(self, index: int) -> SequenceCost:
        """``balance.cost_of_sequence(self.sequence(index)[0])``: no images, the
        attention pairs of the chunk's documents."""
        return documents_cost([(tokens, []) for tokens in self._documents(index, None)], None)

    def _documents(self, index: int, stats: Optional[DataStats]) -> List[List[int]]:
        """The token ids of chunk ``index``'s documents, bad ones skipped (counted and
        logged once into ``stats``; None when planning, which does neither)."""
        documents = []
        for doc, tokens in self.corpus.chunk(index):
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tokenizer.vocab_size):
                error = BadSample(
                    "bad_text",
                    f"token id {int(tokens.max())} outside the "
                    f"vocabulary of {self.tokenizer.vocab_size}",
                )
                if stats is not None:
                    first = self.verdicts.remember(int(doc), error, "load")
                    stats.skip(error, shard="text corpus", key=f"document {doc}", log=first)
                continue
            documents.append(tokens[~np.isin(tokens, self._dropped)].tolist())
        return documents


class MixtureBuilder:
    """Global sequence ``g`` -> the source the schedule picks, and that source's index."""

    def __init__(self, schedule: MixtureSchedule, sources: Dict[str, object]):
        missing = [
            name for name, p in schedule.probabilities.items() if p > 0 and name not in sources
        ]
        if missing:
            raise ValueError(
                f"the mixture gives weight to {missing} but no data is configured for them"
            )
        self.schedule, self.sources = schedule, sources

    def sequence(self, global_index: int) -> Tuple[PackedSequence, DataStats]:
        name, index = self.schedule.locate(global_index)
        return self.sources[name].sequence(index)

    def sequence_cost(self, global_index: int) -> SequenceCost:
        """The ``balance.SequenceCost`` of ``sequence(global_index)``, no image decoded."""
        name, index = self.schedule.locate(global_index)
        return self.sources[name].sequence_cost(index)

    def source_of(self, global_index: int) -> str:
        return self.schedule.source_of(global_index)
