"""Bad samples: the reasons a sample is skipped, and per-reason counts.

A reader raises ``BadSample(reason, detail)``; the source that asked for the sample
catches it, counts it in a ``DataStats`` and logs it with its shard and key, then takes a
replacement. Nothing here talks to other ranks: skipping never changes how many
sequences a rank produces, so ranks stay in step however unevenly their data is bad.
"""

from __future__ import annotations

import logging
from typing import Dict, Iterable, List

logger = logging.getLogger(__name__)

SKIP_REASONS = (
    "corrupt_image",  # the image decoder failed (bad or truncated image data)
    "empty_file",  # a zero-byte image, text or JSON member
    "missing_image",  # the record names an image the sample does not contain
    "bad_text",  # text or JSON that is not valid UTF-8 / JSON, or token ids out of range
    "bad_record",  # valid JSON that does not follow the sample schema
    "truncated_tar",  # a member or sample beyond the readable end of its shard
    "too_long",  # a caption pair longer than a whole sequence
    "excluded",  # a sample a Megatron-Energon dataset's split excludes
    "too_small",  # an image with a side under data.tiling.min_image_side, with tiling on
)
# Not failures: samples of a caption window that did not fit next to the others, and
# conversations cut after their last whole assistant turn that fit a sequence.
PACKING_STATS = ("unused_samples", "shortened_conversations")
STAT_NAMES = SKIP_REASONS + PACKING_STATS


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise AssertionError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataStats:
    """Counts per name in ``STAT_NAMES``; ``skip`` also logs the sample's shard and key."""

    def __init__(self):
        self.counts: Dict[str, int] = {name: 0 for name in STAT_NAMES}

    def skip(self, error: BadSample, *, shard: str, key: str) -> None:
        self.counts[error.reason] += 1
        logger.warning("skipping sample %r of shard %s: %s", key, shard, error)

    def add(self, name: str, count: int = 1) -> None:
        self.counts[name] += count

    def as_list(self) -> List[int]:
        return [self.counts[name] for name in STAT_NAMES]

    def merge(self, values: Iterable[int]) -> None:
        for name, value in zip(STAT_NAMES, values):
            self.counts[name] += int(value)
