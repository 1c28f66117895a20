"""``mm1 <verb>``: the help, an unknown verb, a verb and its old ``mm1-<verb>`` name give
the same result, an old flag spelling still works and says what replaced it, and the help
of the verbs that need no torch does not load it."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mm1_megatron.cli import VERBS, main

REPO = Path(__file__).resolve().parents[2]
RENDER = [
    "launch",
    "render",
    "--config",
    "configs/mm1_30b.yaml",
    "--config",
    "cluster/overlays/example_h100.yaml",
    "--target",
    "jobset",
    "--skip-shellcheck",
]


@pytest.fixture
def quiet_logging(monkeypatch, caplog):
    """The verbs reconfigure logging for a terminal; keep pytest's capture instead."""
    monkeypatch.setattr("mm1_megatron.launch.cli.setup_logging", lambda: None)
    monkeypatch.chdir(REPO)  # render.json names the configs relative to the repository
    caplog.set_level(logging.INFO)


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mm1 [-h] <verb> ...")
    for name, verb in VERBS.items():
        assert f"    {name}" in out and verb.summary.split()[0] in out


@pytest.mark.parametrize("argv", [["fly"], [], ["--output", "x"]])
def test_an_unknown_or_missing_verb_exits_2_with_the_list(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mm1 [-h] <verb> ...")
    if argv == ["fly"]:
        assert "invalid choice: 'fly'" in err and all(repr(name) in err for name in VERBS)


def test_a_verb_help_names_the_mm1_command(capsys):
    with pytest.raises(SystemExit):
        main(["data", "shards", "coco", "--help"])
    assert capsys.readouterr().out.startswith("usage: mm1 data shards coco [-h]")


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_the_verb_and_its_old_console_script_do_the_same(tmp_path, quiet_logging):
    from mm1_megatron.launch.cli import main as mm1_launch  # what mm1-launch runs

    assert main([*RENDER, "--output", str(tmp_path / "verb")]) == 0
    assert mm1_launch([*RENDER[1:], "--output", str(tmp_path / "alias")]) == 0
    assert _files(tmp_path / "verb") == _files(tmp_path / "alias")
    assert sorted(_files(tmp_path / "verb")) == ["jobset.yaml", "render.json"]


def test_a_deprecated_spelling_warns_and_works(tmp_path, quiet_logging, caplog):
    assert main([*RENDER, "--output", str(tmp_path / "new")]) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert main([*RENDER, "--out", str(tmp_path / "old")]) == 0
    assert _files(tmp_path / "old") == _files(tmp_path / "new")
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.name == "mm1_megatron.cli" and warning.getMessage() == (
        "mm1 launch render: --out is deprecated and goes in the next release; use --output"
    )


# The verbs whose --help must not load torch: they run without it, or need it only later.
LIGHT_HELP = [["--help"], *([verb, "--help"] for verb in ("train", "launch", "data", "sweep"))]
LIGHT_HELP.append(["data", "shards", "coco", "--help"])


@pytest.mark.slow  # a fresh interpreter: this one has imported torch long ago
def test_help_imports_no_torch():
    code = (
        "import json, sys\n"
        "from mm1_megatron.cli import main\n"
        "loaded = {}\n"
        f"for argv in {LIGHT_HELP!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "    loaded[' '.join(argv)] = sorted({'torch', 'megatron'} & set(sys.modules))\n"
        "print(json.dumps(loaded), file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stderr.strip().splitlines()[-1])
    assert loaded == {" ".join(argv): [] for argv in LIGHT_HELP}
