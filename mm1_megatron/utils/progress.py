"""A one-line progress report on stderr for the command-line tools (no dependencies)."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def _bar(count: int, total: int, width: int = 20) -> str:
    filled = min(width, int(width * count / max(total, 1)))
    return "[" + "#" * filled + "." * (width - filled) + f"] {count}/{total}"


class ProgressLine:
    """``label [####......] 120/500 | 35.2/s | eta 0:00:10 | note``.

    Redrawn in place on a terminal; on a pipe or log file, one line every ``interval`` s.
    """

    def __init__(
        self,
        label: str,
        total: Optional[int] = None,
        *,
        unit: str = "items",
        stream: Optional[TextIO] = None,
        interval: float = 0.2,
    ):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.interactive else max(interval, 5.0)
        self.count = 0
        self.note = ""
        self.start = time.monotonic()
        self._last_draw = 0.0

    def update(self, count: int = 1, note: Optional[str] = None) -> None:
        self.count += count
        if note is not None:
            self.note = note
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic())
        if self.interactive:
            self.stream.write("\n")
        self.stream.flush()

    def _draw(self, now: float) -> None:
        self._last_draw = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        if self.total:
            head = _bar(self.count, self.total)
            eta = (self.total - self.count) / rate if rate > 0 else 0.0
            tail = f" | eta {_format_seconds(eta)}"
        else:
            head, tail = f"{self.count}", ""
        line = f"{self.label} {head} {self.unit} | {rate:.1f}/s{tail}"
        if self.note:
            line += f" | {self.note}"
        self.stream.write(("\r" + line + "\x1b[K") if self.interactive else line + "\n")
        self.stream.flush()
