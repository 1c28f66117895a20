"""The docs match the code: every config field is documented in its own section of the
configuration reference, and every repository path the README and docs name exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from mm1_megatron.config.schema import MM1Config

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"


def _fields(cls, prefix=""):
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type) or (
            isinstance(field.type, str)
            and field.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(field.default_factory)
        ):
            yield from _fields(field.default_factory, f"{prefix}{field.name}.")
        else:
            yield prefix.rstrip("."), field.name


def documented_pairs(text: str) -> set:
    """``(section, field)`` for every table row: the section is the ``## a.b`` heading
    (a row ``sub.field`` in it means section ``a.b.sub``)."""
    pairs, sections = set(), []
    for line in text.splitlines():
        heading = re.match(r"## ([a-z_.]+)(?: \(.*\))?(?: and ([a-z_.]+))?\s*$", line)
        if heading:
            sections = [heading.group(1)]
            continue
        if line.startswith("## "):
            sections = []
        cells = line.split("|")
        if len(cells) > 2 and sections:  # a table row: the first cell names the fields
            for dotted in re.findall(r"`([a-z_0-9.]+)`", cells[1]):
                *sub, name = dotted.split(".")
                pairs.add((".".join([sections[0], *sub]), name))
    return pairs


def test_every_config_field_is_documented_in_its_section():
    documented = documented_pairs(DOC.read_text())
    missing = [
        f"{section}.{name}"
        for section, name in _fields(MM1Config)
        if (section, name) not in documented
    ]
    assert not missing, f"config fields missing from their section of {DOC.name}: {missing}"


def test_the_section_parser_sees_nested_rows():
    text = (
        "## model.llm (decoder) and model.llm.moe\n| `moe.top_k` | 2 | x |\n"
        "| `hidden_size`, `num_layers` | 3B | shapes |\n## The MM1 shapes\n| `stray` | 1 | x |"
    )
    assert documented_pairs(text) == {
        ("model.llm.moe", "top_k"),
        ("model.llm", "hidden_size"),
        ("model.llm", "num_layers"),
    }


PATH_PATTERN = re.compile(
    r"`((?:mm1_megatron|configs|docs|tools|tests|cluster|examples|\.ci)/[A-Za-z0-9_./-]+)`"
)


def test_every_repository_path_in_the_docs_exists():
    missing = []
    for doc in [
        REPO / "README.md",
        REPO / "CONTRIBUTING.md",
        *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "mm1_megatron").rglob("README.md")),
    ]:
        for match in PATH_PATTERN.finditer(doc.read_text()):
            path = match.group(1).split("::")[0].rstrip(".")
            if not (REPO / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, missing
