"""Bad samples: the reasons a sample is skipped, per-reason counts, and how they are logged.

A reader raises ``BadSample(reason, detail)``; the source that asked for the sample
catches it, counts it in a ``DataStats`` and takes a replacement. Nothing here talks to
other ranks: skipping never changes how many sequences a rank produces, so ranks stay in
step however unevenly their data is bad.

Everything that parses bytes a dataset supplies runs through ``parse_untrusted``, so a
sample can only ever be parsed or skipped: any exception it provokes (a ``RecursionError``
from JSON nested 100,000 deep, a ``TypeError`` from a list where a name belongs, ...)
becomes a ``BadSample``. A bug in our own packing code still stops the run with its
traceback; only ``MemoryError`` (a skip cannot give memory back) and I/O errors
(``OSError``: a failing disk or mount is no sample's fault) pass through.

Logging (``SkipVerdicts``, ``SkipSummary``): each process logs a skipped sample once, at
WARNING with its shard, key and reason, and remembers its verdict so that drawing it
again (as a replacement, in a later epoch) neither reads, tokenizes nor decodes it again;
later skips are only counted. The loader logs one summary line per interval with the
skips since the last one.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Dict, Iterable, List, Optional, TypeVar

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

MAX_DETAIL = 300  # characters of a skip's detail (it quotes the data) kept in messages
MAX_REMEMBERED_SKIPS = 100_000  # verdicts per corpus and process (about 8 MB at most)
SKIP_SUMMARY_SECONDS = 60.0  # at most one summary line per this many seconds
STAGES = ("load", "decode")  # where a verdict was reached, and is replayed

T = TypeVar("T")


def shorten(text: str, limit: int = MAX_DETAIL) -> str:
    if len(text) <= limit:
        return text
    return f"{text[: limit // 2]} ... {text[-limit // 4 :]} ({len(text)} characters)"


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise AssertionError(f"unknown skip reason {reason!r}")
        detail = shorten(detail)
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_untrusted(what: str, parse: Callable[..., T], *args, reason: str = "bad_record") -> T:
    """``parse(*args)`` on data a dataset supplies: any exception but ``BadSample`` (and
    ``MemoryError`` or an I/O error, ``OSError``, which are not the data's) becomes
    ``BadSample(reason)`` naming ``what`` and the error."""
    try:
        return parse(*args)
    except (BadSample, MemoryError, OSError):
        raise
    except RecursionError as exc:
        raise BadSample(reason, f"{what} is nested too deeply to parse") from exc
    except Exception as exc:  # the data decides what fails here, not our code
        raise BadSample(reason, f"{what}: {type(exc).__name__}: {exc}") from exc


class DataStats:
    """Counts per name in ``STAT_NAMES``; ``skip`` also logs the sample's shard and key."""

    def __init__(self):
        self.counts: Dict[str, int] = {name: 0 for name in STAT_NAMES}

    def skip(self, error: BadSample, *, shard: str, key: str, log: bool = True) -> None:
        """Count a skipped sample; ``log``: also log it (the first time this process meets
        it). The key comes from the shard: it is shortened like the detail."""
        self.counts[error.reason] += 1
        if log:
            logger.warning(
                "skipping sample %r of shard %s: %s (logged once; later skips of it are "
                "only counted)",
                shorten(key),
                shard,
                error,
            )

    def add(self, name: str, count: int = 1) -> None:
        self.counts[name] += count

    def as_list(self) -> List[int]:
        return [self.counts[name] for name in STAT_NAMES]

    def merge(self, values: Iterable[int]) -> None:
        for name, value in zip(STAT_NAMES, values):
            self.counts[name] += int(value)


class SkipVerdicts:
    """The verdicts of the samples this process skipped, by sample id (an int the corpus
    gives each sample), and the stage that reached each: ``load`` (reading, parsing,
    tokenizing, fitting) or ``decode`` (the images). Bounded: at ``max_entries`` it
    starts over (each sample is then read again, and logged once more, when next met)."""

    def __init__(self, max_entries: int = MAX_REMEMBERED_SKIPS):
        self.max_entries = max_entries
        self._verdicts: Dict[int, int] = {}  # sample id -> reason and stage, as one int

    def recall(self, sample: int, stage: str) -> Optional[BadSample]:
        """The remembered skip of ``sample`` reached at ``stage``, or None."""
        code = self._verdicts.get(sample)
        if code is None or code % len(STAGES) != STAGES.index(stage):
            return None
        return BadSample(SKIP_REASONS[code // len(STAGES)], "skipped before (logged then)")

    def remember(self, sample: int, error: BadSample, stage: str) -> bool:
        """Keep the verdict; True when it is new (the skip should be logged)."""
        if sample in self._verdicts:
            return False
        if len(self._verdicts) >= self.max_entries:
            logger.info("forgetting %d skipped samples (the most kept)", len(self._verdicts))
            self._verdicts.clear()
        code = SKIP_REASONS.index(error.reason) * len(STAGES) + STAGES.index(stage)
        self._verdicts[sample] = code
        return True

    def __len__(self) -> int:
        return len(self._verdicts)


class SkipSummary:
    """One INFO line per ``interval_s`` seconds (checked at each batch) when samples were
    skipped since the last line: ``skipped K samples since the last report: reason=n``."""

    def __init__(
        self, interval_s: Optional[float] = None, clock: Optional[Callable[[], float]] = None
    ):
        self.interval_s = SKIP_SUMMARY_SECONDS if interval_s is None else interval_s
        self.clock = clock or time.monotonic
        self._last_time = self.clock()
        self._reported: Dict[str, int] = {reason: 0 for reason in SKIP_REASONS}

    def update(self, counts: Dict[str, int]) -> None:
        """``counts``: cumulative skips per reason (the loader's)."""
        now = self.clock()
        if now - self._last_time < self.interval_s:
            return
        new = {
            r: counts[r] - self._reported[r] for r in SKIP_REASONS if counts[r] > self._reported[r]
        }
        self._last_time = now
        if not new:
            return
        self._reported = {reason: counts[reason] for reason in SKIP_REASONS}
        logger.info(
            "skipped %d samples since the last report: %s (%d in all)",
            sum(new.values()),
            ", ".join(f"{reason}={count}" for reason, count in new.items()),
            sum(self._reported.values()),
        )
