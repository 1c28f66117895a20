"""Multi-node torchrun and elastic restarts, on this machine.

Two torchrun agents (``--nnodes 2``, c10d rendezvous on 127.0.0.1, 2 processes each) are
two "nodes" of one 4-process job: TP=2 x DP=2 must train exactly as the uninterrupted
single-process reference (``tests/conftest.py``), to the 1e-5 relative that every
layout meets (``tests/parallel/test_layouts.py``). Then an elastic restart: with
``--max-restarts 1``, a worker killed mid-run makes torchrun restart the group, which
resumes from the newest checkpoint and finishes with the reference's losses.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mm1_megatron.checkpoint import layout
from tests.conftest import REFERENCE_STEPS
from tests.launch import REPO, clean_env

# Starts processes (scripts, launchers, tools): the slow tier.
pytestmark = pytest.mark.slow

RELATIVE_TOLERANCE = 1e-5
TRAIN = ["-m", "mm1_megatron.train", "--config", "configs/debug.yaml"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*arguments: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *arguments],
            cwd=REPO,
            env=clean_env(),
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def _losses(run: Path) -> dict:
    """Step -> loss; a resumed run appends, the last record of a step wins."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def _assert_matches_reference(run: Path, reference: Path) -> None:
    expected = _losses(reference / "run")
    measured = _losses(run)
    assert sorted(measured) == sorted(expected) == list(range(1, REFERENCE_STEPS + 1))
    for step, loss in expected.items():
        assert measured[step] == pytest.approx(loss, rel=RELATIVE_TOLERANCE), f"step {step}"


def test_two_torchrun_agents_train_tp2_like_a_single_process(reference, tmp_path):
    endpoint = f"127.0.0.1:{_free_port()}"
    overrides = [
        "parallel.tensor_parallel_size=2",
        f"training.train_steps={REFERENCE_STEPS}",
        "logging.tensorboard=false",
        f"logging.output_dir={tmp_path / 'run'}",
    ]
    agents = [
        _torchrun(
            "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", endpoint, "--rdzv-id", "mm1-two-nodes", *TRAIN, *overrides,
            log=tmp_path / f"agent{node}.log",
        )
        for node in range(2)
    ]  # fmt: skip
    for node, agent in enumerate(agents):
        agent.wait(timeout=600)
        assert agent.returncode == 0, (tmp_path / f"agent{node}.log").read_text()[-4000:]
    log = (tmp_path / "agent0.log").read_text() + (tmp_path / "agent1.log").read_text()
    assert "DP=2" in log, log[-3000:]  # TP=2 x DP=2: the 4 processes of both agents
    _assert_matches_reference(tmp_path / "run", reference)


def _training_workers(agent: subprocess.Popen) -> list:
    return [
        p
        for p in psutil.Process(agent.pid).children(recursive=True)
        if "mm1_megatron.train" in " ".join(p.cmdline())
    ]


def test_a_killed_worker_restarts_the_group_which_resumes_and_finishes(reference, tmp_path):
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    agent = _torchrun(
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *TRAIN,
        "parallel.tensor_parallel_size=2", f"training.train_steps={REFERENCE_STEPS}",
        "logging.tensorboard=false", f"logging.output_dir={run}", f"checkpoint.save_dir={ckpt}",
        "checkpoint.save_interval=2", "checkpoint.keep_last=5",
        log=tmp_path / "agent.log",
    )  # fmt: skip
    deadline = time.monotonic() + 300
    # ``latest``, not the first complete folder: the pointer is written after the folder
    # is renamed into place, and a busy machine can run this check in between.
    while time.monotonic() < deadline and layout.read_latest(ckpt) is None:
        assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-4000:]
        time.sleep(0.05)
    first = _training_workers(agent)
    assert len(first) == 2
    killed_after = layout.step_of(layout.read_latest(ckpt))
    assert killed_after < REFERENCE_STEPS, "the run finished before a worker could be killed"
    first[1].send_signal(signal.SIGKILL)
    agent.wait(timeout=600)
    output = (tmp_path / "agent.log").read_text()
    assert agent.returncode == 0, output[-4000:]
    # torchrun started a second group (new processes), which resumed from the checkpoint.
    assert "restart" in output.lower(), output[-4000:]
    assert "resum" in output.lower(), output[-4000:]
    _assert_matches_reference(run, reference)
