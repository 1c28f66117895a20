"""The docs match the code: every config field is documented in its own section of the
configuration reference, every repository path the README and docs name exists, and every
``mm1 <verb>`` command they show parses with that verb's options, under its new name."""

from __future__ import annotations

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest

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


DOCS = [
    REPO / "README.md",
    REPO / "CONTRIBUTING.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "mm1_megatron").rglob("README.md")),
]


def test_every_repository_path_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        for match in PATH_PATTERN.finditer(doc.read_text()):
            path = match.group(1).split("::")[0].rstrip(".")
            if not (REPO / path).exists():
                missing.append(f"{doc.relative_to(REPO)}: {path}")
    assert not missing, missing


def documented_commands(text: str):
    """``(line number, argv)`` of every ``mm1 <verb> ...`` line in the shell code blocks
    (continuation lines joined, comments and ``[--optional]`` placeholders dropped)."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        pending += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        words = shlex.split(re.sub(r"\[--[^]]*\]", "", pending), comments=True)
        pending = ""
        if words and words[0].endswith("mm1") and len(words) > 1:
            yield start, words[1:]


def test_the_command_finder_sees_continued_lines():
    text = "```bash\nmm1 data shards coco a.json \\\n    --output x [--verify-images]  # c\n```"
    assert list(documented_commands(text)) == [
        (2, ["data", "shards", "coco", "a.json", "--output", "x"])
    ]


def refused_commands(text: str) -> list:
    """The documented ``mm1`` commands their verb's parser refuses, with its message."""
    import contextlib
    import io

    from mm1_megatron.cli import VERBS

    refused = []
    for line, argv in documented_commands(text):
        verb = VERBS.get(argv[0])
        if verb is None:
            refused.append(f"line {line}: mm1 {argv[0]} is not a verb")
            continue
        parser = importlib.import_module(verb.module).build_parser()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(argv[1:])
        except SystemExit:
            refused.append(f"line {line}: {err.getvalue().strip().splitlines()[-1]}")
    return refused


def test_a_bad_documented_command_is_refused():
    text = "```bash\nmm1 fly\nmm1 sweep run runs/s --only a b\nmm1 train --config c.yaml\n```"
    assert refused_commands(text) == [
        "line 2: mm1 fly is not a verb",
        "line 3: mm1 sweep: error: unrecognized arguments: b",
    ]


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_every_documented_command_parses(doc):
    assert refused_commands(doc.read_text()) == []


OLD_NAMES = re.compile(r"mm1-(train|convert|eval|estimate|sweep|report|launch)(?![-\w])")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_the_docs_name_commands_as_mm1_verbs(doc):
    """``mm1 train``, not ``mm1-train`` (the old names still run, for scripts); the
    data-preparation scripts are ``mm1 data`` now."""
    old = [
        f"line {number}: {line.strip()}"
        for number, line in enumerate(doc.read_text().splitlines(), 1)
        if (OLD_NAMES.search(line) and "console script" not in line)
        or re.search(r"tools/(build_shards|build_text_index|train_tokenizer)", line)
    ]
    assert not old, old
