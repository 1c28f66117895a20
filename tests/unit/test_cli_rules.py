"""Every verb of ``mm1`` spells its options one way (``mm1_megatron/cli/flags.py``): each
verb's parser, sub-commands included, is walked and checked, and a deliberately bad parser
shows that the checks fail. ``mm1 --help`` lists exactly the verb table, and every
``mm1-<verb>`` console script in setup.py runs the same function as its verb."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from mm1_megatron.cli import VERBS, main
from mm1_megatron.cli.flags import DEPRECATED_FLAGS

REPO = Path(__file__).resolve().parents[2]
THE_VERBS = ["train", "convert", "eval", "estimate", "balance", "sweep", "report", "launch", "data"]
# The output folder / file is --output: these name the same thing another way.
OTHER_OUTPUT_SPELLINGS = re.compile(
    r"^(-o|--out(?!put$)[-_a-z]*|--output[-_][-_a-z]+|--dest(ination)?|--save[-_]?(dir|to)?)$"
)


def walk(
    parser: argparse.ArgumentParser, path: str
) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    """``(command path, parser)`` of the parser and of every sub-command under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def problems(parser: argparse.ArgumentParser, path: str) -> List[str]:
    """What breaks the spelling rules in ``parser`` and its sub-commands."""
    found = []
    for where, one in walk(parser, path):
        for action in one._actions:
            options = action.option_strings
            if not options:
                continue  # a positional: free lists (run folders, overrides) may stay
            help_text = action.help or ""
            if help_text == argparse.SUPPRESS:
                for option in options:
                    if option in ("-h", "--help"):
                        continue
                    if option not in DEPRECATED_FLAGS:
                        found.append(f"{where} {option}: hidden but not in DEPRECATED_FLAGS")
                    elif action.dest != _dest(DEPRECATED_FLAGS[option][0]):
                        found.append(
                            f"{where} {option}: does not give {DEPRECATED_FLAGS[option][0]}"
                        )
                continue
            for option in options:
                if option in DEPRECATED_FLAGS:
                    found.append(f"{where} {option}: a deprecated spelling in --help")
                elif OTHER_OUTPUT_SPELLINGS.match(option):
                    found.append(f"{where} {option}: the output is spelled --output")
            if "--config" in options and not isinstance(action, argparse._AppendAction):
                found.append(f"{where} --config: not repeatable (action='append')")
            if action.nargs in ("+", "*"):
                found.append(f"{where} {options[-1]}: nargs={action.nargs!r}; repeat the flag")
            if re.search(r"comma[- ]separated|comma list", help_text, re.IGNORECASE):
                found.append(f"{where} {options[-1]}: a comma list; repeat the flag")
            if "--json" in options and not (
                isinstance(action, argparse._StoreTrueAction) and "stdout" in help_text
            ):
                found.append(f"{where} --json: not a flag printing one JSON object on stdout")
    return found


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    return importlib.import_module(VERBS[verb].module).build_parser()


def test_the_verb_table():
    assert list(VERBS) == THE_VERBS


@pytest.mark.parametrize("verb", THE_VERBS)
def test_every_verb_follows_the_spelling_rules(verb):
    parser = _verb_parser(verb)
    assert problems(parser, f"mm1 {verb}") == []
    assert parser.prog == f"mm1 {verb}"  # the usage line names the command people type


@pytest.mark.parametrize("verb", THE_VERBS)
def test_every_verb_runs_from_a_list_of_arguments(verb):
    """``main(argv)`` reads the list it is given (tests call it in-process), not sys.argv."""
    with pytest.raises(SystemExit) as exit_info:
        VERBS[verb].load()(["--help"])
    assert exit_info.value.code == 0


def test_the_checks_see_a_bad_parser():
    parser = argparse.ArgumentParser(prog="mm1 bad")
    parser.add_argument("--out", help="folder")
    parser.add_argument("--config", help="one YAML file")
    parser.add_argument("--only", nargs="+")
    parser.add_argument("--json", action="store_true", help="also write report.json")
    commands = parser.add_subparsers(dest="command")
    sub = commands.add_parser("run")
    sub.add_argument("--output-dir")
    sub.add_argument("--tasks", help="comma-separated task names")
    sub.add_argument("--old-name", dest="output", help=argparse.SUPPRESS)
    sub.add_argument("files", nargs="*")  # a positional list is fine
    assert problems(parser, "mm1 bad") == [
        "mm1 bad --out: a deprecated spelling in --help",
        "mm1 bad --config: not repeatable (action='append')",
        "mm1 bad --only: nargs='+'; repeat the flag",
        "mm1 bad --json: not a flag printing one JSON object on stdout",
        "mm1 bad run --output-dir: a deprecated spelling in --help",
        "mm1 bad run --tasks: a comma list; repeat the flag",
        "mm1 bad run --old-name: hidden but not in DEPRECATED_FLAGS",
    ]
    other = argparse.ArgumentParser(prog="mm1 other")
    other.add_argument("--out-folder")
    other.add_argument("--out", dest="folder", help=argparse.SUPPRESS)
    assert problems(other, "mm1 other") == [
        "mm1 other --out-folder: the output is spelled --output",
        "mm1 other --out: does not give --output",
    ]


def test_mm1_help_lists_exactly_the_verb_table(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = re.findall(r"^    ([a-z][a-z-]*)(?:\s{2,}(\S.*))?$", capsys.readouterr().out, re.M)
    assert [name for name, _ in listed] == THE_VERBS
    assert all(summary for _, summary in listed)  # one line each, next to the name


def _console_scripts() -> dict:
    text = (REPO / "setup.py").read_text()
    return dict(re.findall(r'"(mm1[-a-z]*)=([\w.]+:\w+)"', text))


def test_every_console_script_runs_its_verb():
    scripts = _console_scripts()
    assert scripts.pop("mm1") == "mm1_megatron.cli:main"
    assert sorted(scripts) == sorted(f"mm1-{v}" for v in THE_VERBS if v != "data")
    for name, target in scripts.items():
        verb = name.removeprefix("mm1-")
        assert target == VERBS[verb].entry_point, name
        module, function = target.split(":")
        assert getattr(importlib.import_module(module), function) is VERBS[verb].load()
