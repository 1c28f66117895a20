"""Two processes with TP=2 (gloo) reproduce a single-process run of the same seed and data.

fp32 on CPU; tolerance 1e-5 relative: TP splits matmuls into partial sums that are
all-reduced, so results differ from the single-process run only by summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUM_STEPS = 3


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(output_dir: Path, num_procs: int, *overrides: str) -> list:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(REPO)
    args = ["-m", "mm1_megatron.train", "--config", "configs/debug.yaml",
            f"training.train_steps={NUM_STEPS}", f"logging.output_dir={output_dir}",
            "logging.tensorboard=false", *overrides]
    if num_procs == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                   str(num_procs), "--master-port", _free_port(), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("tp1"), 1)


def test_tensor_parallel_matches_single_process(reference, tmp_path):
    sharded = _run(tmp_path, 2, "parallel.tensor_parallel_size=2")
    assert len(sharded) == len(reference) == NUM_STEPS
    for ref, tp in zip(reference, sharded):
        assert tp["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert tp["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert sharded[-1]["loss"] < sharded[0]["loss"]
