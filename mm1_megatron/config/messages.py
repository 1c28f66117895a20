"""Bounded config error messages: values cut to a readable length, problems listed once.

A config value can be anything YAML builds, including a list of a million entries; its
full ``repr`` in a log line helps nobody, so every value in a message goes through
``short``, every line through ``cut``, and a list of problems through ``problems_error``.
"""

from __future__ import annotations

import reprlib
from typing import Any, Sequence

MAX_VALUE_CHARS = 120  # a value as shown in a message
MAX_LINE_CHARS = 1000  # one problem
MAX_LISTED = 50  # problems listed in one error; the rest are counted

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxdict = 5
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = 8


def cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    """``text`` itself, or its first ``limit`` characters ending in ``...``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any) -> str:
    """A ``repr`` of ``value`` of at most ``MAX_VALUE_CHARS`` characters."""
    try:
        text = _REPR.repr(value)
    except Exception:  # an int too long to print in decimal, or inside a list
        if isinstance(value, int):
            return f"<an integer of {value.bit_length()} bits>"
        return f"<{type(value).__name__}>"
    return cut(text)


def problems_error(messages: Sequence[str]) -> ValueError:
    """One ``ValueError`` for all ``messages``: the message itself when there is one, else
    ``Invalid configuration:`` and one line each (the format of ``validate_config``)."""
    lines = [cut(" ".join(m.splitlines()), MAX_LINE_CHARS) for m in messages[:MAX_LISTED]]
    if len(messages) > MAX_LISTED:
        lines.append(f"... and {len(messages) - MAX_LISTED} more")
    if len(lines) == 1:
        return ValueError(lines[0])
    return ValueError("Invalid configuration:\n  - " + "\n  - ".join(lines))
