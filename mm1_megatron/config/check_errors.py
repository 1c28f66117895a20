"""The collector every config check reports to: each problem is kept, none stops the
others, so a user sees them all at once (``validation.py``)."""

from __future__ import annotations

from typing import List


class Errors:
    def __init__(self):
        self.messages: List[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)

    def positive(self, obj, names, prefix: str) -> None:
        for name in names:
            value = getattr(obj, name)
            self.check(value > 0, f"{prefix}.{name}={value} must be > 0")
