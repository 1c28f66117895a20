"""A measured distribution of images (tiles) per sequence: ``mm1 estimate
--images-distribution FILE``.

The file is JSON: ``{"images_per_sequence": {"0": 120, "3": 410, ...}}`` (image count ->
sequences seen with it, the histogram ``mm1 balance --output FILE`` writes), or that
object alone. FLOPs and step time take its mean; memory stays at the image cap; the
vision-stage recommendation (``vision_stage.py``) gives every micro-batch its own count.

Quantiles are the inverted CDF (numpy's ``method="inverted_cdf"``): the ``u`` quantile is
the smallest count ``c`` with ``P(count <= c) >= u``, always a count that was seen.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

KEY = "images_per_sequence"
# Micro-batch k takes the quantile ranked by frac(k / golden ratio): a fixed order in which
# every run of consecutive micro-batches spans the distribution (Weyl's sequence).
GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class ImageCounts:
    counts: Tuple[int, ...]  # image counts seen, ascending
    sequences: Tuple[int, ...]  # sequences seen with each

    @property
    def total(self) -> int:
        return sum(self.sequences)

    @property
    def mean(self) -> float:
        return sum(c * n for c, n in zip(self.counts, self.sequences)) / self.total

    @property
    def max(self) -> int:
        return self.counts[-1]

    def quantile(self, u: float) -> int:
        """The smallest count with at least a share ``u`` of the sequences at or below it."""
        return int(quantile(self.counts, self.sequences, u))

    def micro_batch_totals(self, micro: int) -> Tuple[List[int], List[float]]:
        """Images of a micro-batch of ``micro`` sequences drawn independently: the values
        and probabilities of the ``micro``-fold convolution of the histogram."""
        base = {c: n / self.total for c, n in zip(self.counts, self.sequences)}
        totals = {0: 1.0}
        for _ in range(micro):
            nxt: Dict[int, float] = {}
            for a, pa in totals.items():
                for c, pc in base.items():
                    nxt[a + c] = nxt.get(a + c, 0.0) + pa * pc
            totals = nxt
        values = sorted(totals)
        return values, [totals[v] for v in values]

    def draw(self, num_microbatches: int, micro: int = 1) -> List[int]:
        """Images of each of ``num_microbatches`` micro-batches (of ``micro`` sequences):
        the micro-batch total's quantiles at the evenly spaced levels ``(i + 0.5) / M``, in
        a fixed interleaved order (micro-batch ``k`` takes the level ranked like
        ``frac(k x 0.618..)``). Each value appears in proportion to its probability (to
        within one micro-batch), their mean tends to ``micro x`` the distribution's, and
        no stretch of consecutive micro-batches is all light or all heavy, as in a shuffled
        stream; sorted draws would put every heavy micro-batch into the drain."""
        n = num_microbatches
        values, weights = self.micro_batch_totals(micro)
        ascending = [int(quantile(values, weights, (i + 0.5) / n)) for i in range(n)]
        phases = [(k * GOLDEN) % 1.0 for k in range(n)]
        rank = {k: r for r, k in enumerate(sorted(range(n), key=phases.__getitem__))}
        return [ascending[rank[k]] for k in range(n)]

    def summary(self) -> Dict[str, float]:
        return {
            "sequences": self.total,
            "mean": self.mean,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "max": self.max,
        }

    def to_dict(self) -> dict:
        histogram = {str(c): n for c, n in zip(self.counts, self.sequences)}
        return {**self.summary(), KEY: histogram}

    def describe(self) -> str:
        return (
            f"mean {self.mean:.2f}, p50 {self.quantile(0.5)}, p90 {self.quantile(0.9)}, "
            f"max {self.max} images per sequence over {self.total:,} sequences"
        )


def quantile(values: Sequence[float], weights: Sequence[float], u: float) -> float:
    """The inverted-CDF quantile of ``values`` (ascending) with ``weights``."""
    need, seen = u * sum(weights), 0.0
    for value, weight in zip(values, weights):
        seen += weight
        if seen >= need * (1 - 1e-12):
            return value
    return values[-1]


def image_counts_from(data: object, source: str = "the distribution") -> ImageCounts:
    """The histogram of ``data``: ``{"images_per_sequence": {...}}`` or the object alone."""
    if isinstance(data, dict) and isinstance(data.get(KEY), dict):
        data = data[KEY]
    if not isinstance(data, dict) or not data:
        raise ValueError(f'{source}: expected {{"{KEY}": {{"<images>": <sequences>, ...}}}}')
    histogram: Dict[int, int] = {}
    for key, value in data.items():
        try:
            count = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: {key!r} is not an image count") from None
        if count < 0 or isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{source}: {key!r}: {value!r} must be counts >= 0")
        histogram[count] = histogram.get(count, 0) + value
    histogram = {c: n for c, n in histogram.items() if n > 0}
    if not histogram:
        raise ValueError(f"{source}: no sequences")
    counts = tuple(sorted(histogram))
    return ImageCounts(counts, tuple(histogram[c] for c in counts))


# ``--images-distribution mm1``: images per sequence of the embedded synthetic world at
# MM1's mixture and packing (45% interleaved, 45% caption, 10% text; 4096 tokens, 144
# tokens and at most 16 images per sequence), measured by ``mm1 balance --config
# configs/mm1_30b.yaml --dp 4 --steps 50`` over 25,600 sequences. A stated default, not
# MM1's real data: its interleaved documents have 2-4 images (OBELICS-like corpora have a
# longer tail); measure yours with ``mm1 balance --output``.
MM1_SYNTHETIC = {"0": 2470, "2": 3841, "3": 3803, "4": 3900, "16": 11586}


def load_image_counts(path: Union[str, Path]) -> ImageCounts:
    """The histogram in the JSON file ``path``, or ``MM1_SYNTHETIC`` for ``mm1``."""
    if str(path) == "mm1":
        return image_counts_from(MM1_SYNTHETIC, "the MM1 default")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--images-distribution {path}: {exc}") from None
    return image_counts_from(data, f"--images-distribution {path}")
