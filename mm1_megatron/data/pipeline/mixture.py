"""Which source each global sequence comes from, in O(1) per sequence.

Sequences are grouped in blocks of ``MIXTURE_BLOCK``. Every block holds the same number
of sequences of each source: ``MIXTURE_BLOCK x weight``, rounded by largest remainder
(ties to the earlier source in ``SOURCE_IDS`` order), so over any whole block the shares
are the weights to within 1/``MIXTURE_BLOCK``. Inside block ``b`` the order is a
permutation drawn from ``default_rng([seed, MIXTURE_STREAM, b])``.

Because the counts per block are fixed, the *source index* of a sequence (how many
earlier sequences came from the same source) is known without walking the earlier
blocks: ``b x count + rank inside the block``. Sources use it to address their data, so
sequence ``g`` is a pure function of ``(seed, g)``.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np

SOURCE_IDS: Dict[str, int] = {
    "caption": 0,
    "interleaved": 1,
    "text": 2,
    "conversation": 3,
    "preference": 4,  # pairs of answers, for DPO (preferences.py)
    "video": 5,  # clips: frame-time markers and frames, then text (synthetic/video.py)
}
MIXTURE_BLOCK = 1000
MIXTURE_STREAM = 7  # keeps these draws apart from the sources' own streams


def mixture_probabilities(mixture: Dict[str, float]) -> Dict[str, float]:
    """Normalise mixture weights, in ``SOURCE_IDS`` order; unknown or bad weights raise."""
    unknown = sorted(set(mixture) - set(SOURCE_IDS))
    if unknown:
        raise ValueError(f"data.mixture has unknown sources {unknown}; known: {list(SOURCE_IDS)}")
    weights = {name: float(mixture.get(name, 0.0)) for name in SOURCE_IDS}
    if any(w < 0 or not np.isfinite(w) for w in weights.values()):
        raise ValueError(f"data.mixture weights must be finite and >= 0, got {mixture}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"data.mixture weights sum to {total}; at least one must be > 0")
    return {name: w / total for name, w in weights.items()}


def block_counts(probabilities: Dict[str, float], block: int) -> Dict[str, int]:
    """Largest-remainder integer counts summing to ``block``."""
    exact = {name: probabilities.get(name, 0.0) * block for name in SOURCE_IDS}
    counts = {name: int(np.floor(value)) for name, value in exact.items()}
    by_remainder = sorted(
        SOURCE_IDS, key=lambda name: (-(exact[name] - counts[name]), SOURCE_IDS[name])
    )
    for name in by_remainder[: block - sum(counts.values())]:
        counts[name] += 1
    return counts


class MixtureSchedule:
    """``locate(g) -> (source, source_index)`` for global sequence index ``g``."""

    def __init__(self, mixture: Dict[str, float], seed: int, block: int = MIXTURE_BLOCK):
        self.probabilities = mixture_probabilities(mixture)
        self.seed = seed
        self.block = block
        self.counts = block_counts(self.probabilities, block)
        self._pattern: List[str] = [name for name in SOURCE_IDS for _ in range(self.counts[name])]
        self._cached_block = -1
        self._cached: List[Tuple[str, int]] = []

    def locate(self, global_index: int) -> Tuple[str, int]:
        if global_index < 0:
            raise ValueError(f"global sequence index {global_index} must be >= 0")
        block, offset = divmod(global_index, self.block)
        if block != self._cached_block:
            self._cached = self._layout(block)
            self._cached_block = block
        name, rank = self._cached[offset]
        return name, block * self.counts[name] + rank

    def source_of(self, global_index: int) -> str:
        return self.locate(global_index)[0]

    def _layout(self, block: int) -> List[Tuple[str, int]]:
        order = np.random.default_rng([self.seed, MIXTURE_STREAM, block]).permutation(self.block)
        shuffled = [self._pattern[i] for i in order]
        seen = {name: 0 for name in SOURCE_IDS}
        layout = []
        for name in shuffled:
            layout.append((name, seen[name]))
            seen[name] += 1
        return layout
