"""Bad input in a task's files: malformed entries and missing images, found at load time.

Readers turn every well-formed entry into an ``EvalExample`` and report every other one
to a ``Problems`` collector, with the file and the entry's id. After the image files are
checked, ``Problems.resolve`` either raises one ValueError listing them (``on_bad="stop"``)
or logs how many were skipped for each reason (``on_bad="skip"``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Type, Union

from mm1_megatron.evaluation.tasks.records import EvalExample

logger = logging.getLogger(__name__)

OnBad = Literal["stop", "skip"]
ON_BAD_CHOICES: Tuple[str, ...] = ("stop", "skip")
MAX_LISTED = 5

MALFORMED = "malformed entry"
MISSING_IMAGE = "missing image file"
NO_ANNOTATION = "question without annotation"
NO_REFERENCES = "image without captions"
DUPLICATE = "duplicate id"


class MalformedEntry(Exception):
    """An entry lacks a key or holds a value of the wrong type."""


@dataclass(frozen=True)
class Problem:
    split: str  # "eval" or "demo"
    reason: str  # one of the constants above
    message: str  # names the file and the entry's id


def get_field(entry: Any, key: str, kind: Union[Type, Tuple[Type, ...]]) -> Any:
    """``entry[key]``, checked to be an instance of ``kind`` (bools are not ints)."""
    if not isinstance(entry, dict):
        raise MalformedEntry(f"is a {type(entry).__name__}, not an object")
    if key not in entry:
        raise MalformedEntry(f"has no key {key!r}")
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise MalformedEntry(f"has {key!r} = {value!r}, not a {names}")
    return value


def get_strings(entry: Any, key: str) -> List[str]:
    """``entry[key]`` checked to be a list of strings."""
    values = get_field(entry, key, list)
    if not all(isinstance(value, str) for value in values):
        raise MalformedEntry(f"has {key!r} that is not a list of strings")
    return values


def item_fields(entry: Any, key: str, item_key: str) -> List[str]:
    """The string ``item[item_key]`` of every object in the list ``entry[key]``."""
    values = []
    for item in get_field(entry, key, list):
        try:
            values.append(get_field(item, item_key, str))
        except MalformedEntry as error:
            raise MalformedEntry(f"has a {key!r} item that {error}") from None
    return values


def entry_label(entry: Any, index: int, id_keys: Sequence[str]) -> str:
    """``entry with question_id 42``: the first id the entry has, else its index."""
    if isinstance(entry, dict):
        for key in id_keys:
            if isinstance(entry.get(key), (int, str)):
                return f"entry with {key} {entry[key]!r}"
    return f"entry #{index}"


def top_level(data: Any, key: Optional[str], source: Path) -> List[Any]:
    """The entry list ``data[key]`` (``data`` itself for ``key=None``) of a whole file.

    A file without it is not the official file: a ValueError, never a skippable entry.
    """
    entries = data if key is None else data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list):
        what = "list" if key is None else f"{key!r} list"
        raise ValueError(f"{source} does not look like the official file: no top-level {what}")
    return entries


class Problems:
    """Collects the bad entries of one task's files."""

    def __init__(self) -> None:
        self.items: List[Problem] = []

    def add(self, split: str, reason: str, message: str) -> None:
        self.items.append(Problem(split, reason, message))

    def malformed(self, split: str, source: Path, label: str, detail: str) -> None:
        self.add(split, MALFORMED, f"{source}: {label} {detail}")

    def finish_split(
        self, examples: List[EvalExample], split: str, source: Path, id_name: str
    ) -> List[EvalExample]:
        """The examples with a unique id and an existing image file; others are reported."""
        exists: Dict[Path, bool] = {}
        seen = set()
        kept = []
        for example in examples:
            label = f"{id_name} {example.example_id!r} of {source}"
            if example.example_id in seen:
                self.add(split, DUPLICATE, f"{label} appears more than once")
                continue
            seen.add(example.example_id)
            image = example.image
            if isinstance(image, Path):
                if image not in exists:
                    exists[image] = image.is_file()
                if not exists[image]:
                    self.add(split, MISSING_IMAGE, f"image file {image} is missing ({label})")
                    continue
            kept.append(example)
        return kept

    def resolve(self, task: str, on_bad: str) -> Dict[str, int]:
        """Raise (``stop``) or log and count (``skip``) the problems; reason -> count."""
        if on_bad not in ON_BAD_CHOICES:
            raise ValueError(f"on_bad={on_bad!r} must be one of {ON_BAD_CHOICES}")
        if not self.items:
            return {}
        counts = Counter(f"{item.split}: {item.reason}" for item in self.items)
        summary = ", ".join(f"{reason}: {count}" for reason, count in sorted(counts.items()))
        if on_bad == "stop":
            listed = "\n".join(f"  - {item.message}" for item in self.items[:MAX_LISTED])
            more = len(self.items) - MAX_LISTED
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise ValueError(
                f"task {task}: {len(self.items)} bad entries in its files ({summary}):\n"
                f"{listed}{tail}\nFix the files, or load with on_bad='skip' to skip them."
            )
        logger.warning(
            "task %s: skipped %d bad entries (%s); first: %s",
            task,
            len(self.items),
            summary,
            self.items[0].message,
        )
        return dict(sorted(counts.items()))
