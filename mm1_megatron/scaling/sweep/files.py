"""A sweep on disk: ``sweep.json``, one folder per run with its config and launch file,
and running the local ones one after another.

    <sweep>/sweep.json               the spec, the runs (status per run), the pruned runs
    <sweep>/runs/<name>/config.yaml  the resolved config (``mm1 train --config`` reads it)
    <sweep>/runs/<name>/launch.sh    local: mm1 train (torchrun for several processes);
                                     other targets: mm1 launch's file (launch.py)
    <sweep>/runs/<name>/train.log    written by ``mm1 sweep run``

The run's outputs (``metrics.jsonl``, TensorBoard, checkpoints when configured) land in its
folder, which is where ``mm1 report --sweep`` reads them. Expanding again keeps the
status of runs already there, so a sweep can be extended and rerun.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mm1_megatron.config.loader import save_config
from mm1_megatron.scaling.sweep.spec import RUNS_DIR, PlannedRun, SweepSpec, spec_summary
from mm1_megatron.utils.progress import ProgressLine

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
FINISHED = "completed"


def write_sweep(spec: SweepSpec, runs: Sequence[PlannedRun], out_dir: Path) -> Path:
    """Write every kept run's folder and ``sweep.json``; returns the latter."""
    out_dir = Path(out_dir)
    previous = {entry["name"]: entry for entry in _entries(out_dir)}
    kept = []
    for run in runs:
        if run.reason:
            continue
        folder = out_dir / RUNS_DIR / run.name
        save_config(run.config, folder / "config.yaml")
        _write_launch(folder, spec)
        entry = run.entry()
        if run.name in previous and "status" in previous[run.name]:
            entry["status"] = previous[run.name]["status"]
        kept.append(entry)
    document = {
        "name": spec.name,
        "spec": spec_summary(spec),
        "runs": kept,
        "pruned": [run.entry() for run in runs if run.reason],
    }
    return _write_json(out_dir / SWEEP_FILE, document)


def _write_launch(folder: Path, spec: SweepSpec) -> None:
    processes, target = spec.cluster.gpus, spec.cluster.target
    if target != "local":
        from mm1_megatron.scaling.sweep.launch import write_cluster_launch

        write_cluster_launch(folder, spec.configs, processes, target)
        return
    python = shlex.quote(sys.executable)
    if processes == 1:
        command = f'exec "${{PYTHON:-{python}}}" -m mm1_megatron.train --config config.yaml "$@"'
    else:
        command = (
            f'exec "${{PYTHON:-{python}}}" -m torch.distributed.run --standalone '
            f'--nproc-per-node {processes} -m mm1_megatron.train --config config.yaml "$@"'
        )
    script = folder / "launch.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        "# One run of a scaling sweep (mm1 sweep); extra arguments are dotted overrides.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        f"{command}\n"
    )
    script.chmod(0o755)


def _entries(out_dir: Path) -> List[Dict]:
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("runs", []))


def _write_json(path: Path, document: Dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(temporary, path)
    return path


def read_sweep(out_dir: Path) -> Dict:
    path = Path(out_dir) / SWEEP_FILE
    if not path.is_file():
        raise ValueError(f"{out_dir} holds no {SWEEP_FILE}: expand a spec there first")
    return json.loads(path.read_text())


def _set_status(out_dir: Path, name: str, status: str, **extra) -> None:
    document = read_sweep(out_dir)
    for entry in document["runs"]:
        if entry["name"] == name:
            entry.update(status=status, **extra)
    _write_json(Path(out_dir) / SWEEP_FILE, document)


def run_sweep(
    out_dir: Path, *, only: Optional[Sequence[str]] = None, env: Optional[Dict] = None
) -> Dict[str, int]:
    """Run the local runs that have not completed, one after another; returns counts."""
    out_dir = Path(out_dir)
    document = read_sweep(out_dir)
    if document["spec"]["cluster"]["target"] != "local":
        raise ValueError(
            f"{out_dir}: cluster.target={document['spec']['cluster']['target']} runs are "
            "submitted with their launch files, not by mm1 sweep run"
        )
    todo = [e for e in document["runs"] if e.get("status") != FINISHED]
    if only:
        unknown = sorted(set(only) - {e["name"] for e in document["runs"]})
        if unknown:
            raise ValueError(f"--only names {unknown} are not runs of {out_dir}")
        todo = [e for e in todo if e["name"] in only]
    counts = {"completed": 0, "failed": 0, "skipped": len(document["runs"]) - len(todo)}
    bar = ProgressLine("sweep", len(todo), unit="runs")
    for entry in todo:
        status = _run_one(out_dir / RUNS_DIR / entry["name"], env)
        _set_status(out_dir, entry["name"], **status)
        counts["completed" if status["status"] == FINISHED else "failed"] += 1
        bar.update(1, note=f"{entry['name']}: {status['status']}")
    bar.close()
    return counts


def _run_one(folder: Path, env: Optional[Dict]) -> Dict:
    started = time.monotonic()
    with open(folder / "train.log", "w") as log:
        result = subprocess.run(
            ["bash", str(folder / "launch.sh")], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    seconds = round(time.monotonic() - started, 1)
    if result.returncode != 0:
        logger.warning("run %s failed (exit %d): see %s", folder.name, result.returncode, log.name)
        return {"status": "failed", "exit_code": result.returncode, "seconds": seconds}
    return {"status": FINISHED, "seconds": seconds}
