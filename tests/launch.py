"""Starting the real commands from tests, one way: a clean environment (no launcher
variables left over from the test runner) and torchrun ``--standalone`` for several
processes (it picks a free port itself, so parallel test jobs cannot collide)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")


TE_STANDIN = REPO / "tests" / "te" / "standin"


def clean_env(**extra: str) -> dict:
    """``os.environ`` without launcher variables, with the repository importable (and the
    Transformer Engine stand-in first, when this process runs the TE tier on it)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    inherited = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    standin = [p for p in inherited if p and Path(p).resolve() == TE_STANDIN]
    env["PYTHONPATH"] = os.pathsep.join([*standin, str(REPO)])
    env.update(extra)
    return env


def launcher(nproc: int = 1) -> List[str]:
    """``python``, or ``python -m torch.distributed.run --standalone`` for ``nproc > 1``."""
    if nproc == 1:
        return [sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
    ]


def train_command(*overrides: str, config: str = "configs/debug.yaml", nproc: int = 1) -> List[str]:
    return [*launcher(nproc), "-m", "mm1_megatron.train", "--config", config, *overrides]


def run(
    command: Sequence[str], *, env: Optional[dict] = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run from the repository root, capturing text output."""
    return subprocess.run(
        list(command),
        cwd=REPO,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_train(
    *overrides: str,
    nproc: int = 1,
    env: Optional[dict] = None,
    timeout: float = 600,
    config: str = "configs/debug.yaml",
) -> subprocess.CompletedProcess:
    """``mm1-train --config <config> <overrides>`` on ``nproc`` processes."""
    return run(train_command(*overrides, config=config, nproc=nproc), env=env, timeout=timeout)


def kill_left_over(processes: Sequence, grace_s: float = 0.0) -> None:
    """SIGKILL each of ``processes`` (psutil handles) still running after ``grace_s``;
    one that exits meanwhile (between the check and the kill) is not an error."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace_s) if grace_s else ([], processes)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
