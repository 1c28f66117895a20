"""Deterministic, resumable micro-batches of packed synthetic sequences.

Sequence ``g`` (its *global index*) is a pure function of ``(seed, g)``: a fresh
``numpy.random.default_rng([seed, g])`` first draws the sequence's source from the
mixture, then every sample packed into it. Data-parallel rank ``r`` of ``D`` reads global
indices ``r, r + D, r + 2D, ...``, so ranks never share a sequence and micro-batch ``k``
of rank ``r`` is a pure function of ``(seed, k, r, D, micro_batch_size)``. The state is
the number of sequences each rank has consumed.

What it cannot do: it generates on the calling thread (no prefetch workers), and a state
saved with one ``seed`` or ``dp_size`` cannot be resumed with another (the global indices
would no longer line up); ``micro_batch_size`` may change across a resume.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from mm1_megatron.config.schema import DataConfig
from mm1_megatron.data.packing import PackedSequence, check_packing_arguments, pack_sequence
from mm1_megatron.data.synthetic import SyntheticGenerator
from mm1_megatron.data.tokenizer import SyntheticTokenizer, Tokenizer

logger = logging.getLogger(__name__)

SOURCE_IDS: Dict[str, int] = {"caption": 0, "interleaved": 1, "text": 2}
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "document_ids", "images",
              "num_images", "source_ids", "num_real_tokens")


def mixture_probabilities(mixture: Dict[str, float]) -> Dict[str, float]:
    """Normalise mixture weights, in ``SOURCE_IDS`` order; unknown or bad weights raise."""
    unknown = sorted(set(mixture) - set(SOURCE_IDS))
    if unknown:
        raise ValueError(f"data.mixture has unknown sources {unknown}; "
                         f"known: {list(SOURCE_IDS)}")
    weights = {name: float(mixture.get(name, 0.0)) for name in SOURCE_IDS}
    if any(w < 0 or not np.isfinite(w) for w in weights.values()):
        raise ValueError(f"data.mixture weights must be finite and >= 0, got {mixture}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"data.mixture weights sum to {total}; at least one must be > 0")
    return {name: w / total for name, w in weights.items()}


class SyntheticDataLoader:
    """Endless iterator of micro-batch dicts (keys in ``BATCH_KEYS``, see ``collate``)."""

    def __init__(self, data_config: DataConfig, *, seq_length: int, micro_batch_size: int,
                 num_image_tokens: int, image_size: int, image_mean: Sequence[float],
                 image_std: Sequence[float], seed: int, dp_rank: int = 0, dp_size: int = 1,
                 tokenizer: Optional[Tokenizer] = None):
        if data_config.source != "synthetic":
            raise ValueError(f"data.source={data_config.source!r}: SyntheticDataLoader "
                             f"only serves 'synthetic'")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {dp_rank} and {dp_size}")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
        check_packing_arguments(seq_length, num_image_tokens,
                                data_config.max_images_per_sequence, image_mean, image_std)
        self.probabilities = mixture_probabilities(data_config.mixture)
        self.tokenizer = tokenizer if tokenizer is not None else SyntheticTokenizer()
        self.generator = SyntheticGenerator(self.tokenizer, image_size)
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.num_image_tokens = num_image_tokens
        self.max_images = data_config.max_images_per_sequence
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.num_sequences_consumed = 0
        logger.info("synthetic data: mixture %s, dp rank %d/%d, seed %d",
                    {k: round(v, 4) for k, v in self.probabilities.items()},
                    dp_rank, dp_size, seed)

    def global_index(self, local_index: int) -> int:
        """Global index of this rank's ``local_index``-th sequence."""
        return local_index * self.dp_size + self.dp_rank

    def source_of(self, global_index: int) -> str:
        """The source of sequence ``global_index`` (cheap: draws no content)."""
        return self._draw_source(self._rng(global_index))

    def sequence(self, global_index: int) -> PackedSequence:
        """Sequence ``global_index``: a pure function of ``(seed, global_index)``."""
        rng = self._rng(global_index)
        source = self._draw_source(rng)
        return pack_sequence(self.generator.stream(source, rng), seq_length=self.seq_length,
                             num_image_tokens=self.num_image_tokens,
                             max_images=self.max_images, tokenizer=self.tokenizer,
                             image_size=self.image_size, image_mean=self.image_mean,
                             image_std=self.image_std)

    def __iter__(self) -> "SyntheticDataLoader":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        start = self.num_sequences_consumed
        sequences = [self.sequence(self.global_index(start + i))
                     for i in range(self.micro_batch_size)]
        self.num_sequences_consumed += self.micro_batch_size
        return collate(sequences)

    def state_dict(self) -> Dict[str, int]:
        """The same on every rank (each consumed as many sequences), so one copy serves all."""
        return {"num_sequences_consumed": self.num_sequences_consumed, "seed": self.seed,
                "dp_size": self.dp_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Continue with the batch that followed the one the state was saved after."""
        for key in ("seed", "dp_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"data loader state was saved with {key}={state[key]} but "
                                 f"this loader has {key}={getattr(self, key)}")
        consumed = int(state["num_sequences_consumed"])
        if consumed < 0:
            raise ValueError(f"num_sequences_consumed={consumed} must be >= 0")
        self.num_sequences_consumed = consumed

    def _rng(self, global_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, global_index])

    def _draw_source(self, rng: np.random.Generator) -> str:
        """First draw of a sequence's RNG: inverse CDF over ``SOURCE_IDS`` order."""
        u = rng.random()
        cumulative = 0.0
        last_possible = [name for name, p in self.probabilities.items() if p > 0][-1]
        for name, probability in self.probabilities.items():
            cumulative += probability
            if probability > 0 and u < cumulative:
                return name
        return last_possible  # u within rounding of 1.0


def collate(sequences: List[PackedSequence]) -> Dict[str, torch.Tensor]:
    """Stack packed sequences; images concatenate in order of appearance (row-major).

    Images keep the sequences' dtype (float32, or bfloat16 from a bf16 image pipeline).
    """
    def stack(name: str) -> torch.Tensor:
        return torch.stack([getattr(seq, name) for seq in sequences])

    return {
        "tokens": stack("tokens"), "labels": stack("labels"), "loss_mask": stack("loss_mask"),
        "position_ids": stack("position_ids"), "document_ids": stack("document_ids"),
        "images": torch.cat([seq.images for seq in sequences]),
        "num_images": torch.tensor([seq.num_images for seq in sequences], dtype=torch.long),
        "source_ids": torch.tensor([SOURCE_IDS[seq.source] for seq in sequences],
                                   dtype=torch.long),
        "num_real_tokens": torch.tensor([seq.num_real_tokens for seq in sequences],
                                        dtype=torch.long),
    }
