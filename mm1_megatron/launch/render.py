"""Render launch files from a checked plan, and write them with what they came from
(``render.json``: the config files and overrides), so ``mm1 launch check`` can render them
again and compare."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from mm1_megatron.launch import docker, kubernetes, slurm
from mm1_megatron.launch.plan import LaunchPlan

logger = logging.getLogger(__name__)

MANIFEST = "render.json"
TARGETS: Dict[str, Tuple[str, Callable[[LaunchPlan], str]]] = {
    "slurm": (slurm.FILE_NAME, slurm.render_slurm),
    "jobset": (kubernetes.JOBSET_FILE, kubernetes.render_jobset),
    "trainjob": (kubernetes.TRAINJOB_FILE, kubernetes.render_trainjob),
    "docker": (docker.FILE_NAME, docker.render_dockerfile),
}


def expand_targets(targets: Sequence[str]) -> List[str]:
    names = list(TARGETS) if "all" in targets else list(dict.fromkeys(targets))
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown --target {unknown}; choose from {[*TARGETS, 'all']}")
    return names


def render_files(plan: LaunchPlan, targets: Sequence[str]) -> Dict[str, str]:
    """File name -> text for each target (``all`` for every one)."""
    files = {}
    for target in expand_targets(targets):
        name, render = TARGETS[target]
        files[name] = render(plan)
    return files


def manifest_text(plan: LaunchPlan, targets: Sequence[str]) -> str:
    record = {
        "configs": list(plan.inputs.configs),
        "overrides": list(plan.inputs.overrides),
        "targets": expand_targets(targets),
    }
    return json.dumps(record, indent=2) + "\n"


def write_rendered(plan: LaunchPlan, targets: Sequence[str], out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    files = {**render_files(plan, targets), MANIFEST: manifest_text(plan, targets)}
    for name, text in files.items():
        path = out_dir / name
        path.write_text(text)
        if name == slurm.FILE_NAME:
            path.chmod(0o755)
        written.append(path)
        logger.info("wrote %s", path)
    return written
