"""Faults: damaged checkpoints, preemption signals, dead ranks.

Signals and killed ranks need processes of their own; loading damaged checkpoints and the
resumes after a fault run ``mm1 train`` in this process (``tests/in_process.py``)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mm1_megatron.checkpoint import layout
from mm1_megatron.training.preemption import EXIT_PREEMPTED
from tests.conftest import REFERENCE_STEPS
from tests.in_process import CommandResult, train_in_process
from tests.launch import clean_env, kill_left_over

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TRAIN = [
    sys.executable,
    "-m",
    "mm1_megatron.train",
    "--config",
    "configs/debug.yaml",
    "logging.tensorboard=false",
]


def _env() -> dict:
    return clean_env()


def _run(*overrides: str) -> CommandResult:
    return train_in_process("logging.tensorboard=false", *overrides)


def _losses(output_dir: Path) -> dict:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in lines}


def test_truncated_newest_checkpoint_falls_back_to_the_previous(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    # Copy the reference checkpoints so the module fixture stays intact.
    shutil.copytree(reference / "ckpt", ckpt)
    newest = layout.read_latest(ckpt)
    assert newest.name == "step_00000006"
    victim = sorted((newest / "model_optim").glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    result = _run(
        "training.train_steps=6",
        f"logging.output_dir={tmp_path / 'run'}",
        f"checkpoint.load_dir={ckpt}",
    )
    assert result.returncode == 0, result.log[-3000:]
    assert "skipping damaged checkpoint step_00000006" in result.log
    assert victim.name in result.log
    resumed = _losses(tmp_path / "run")
    expected = _losses(reference / "run")
    assert sorted(resumed) == [5, 6]  # resumed from step 4
    assert all(resumed[step] == expected[step] for step in resumed)


def test_explicitly_loading_a_damaged_checkpoint_fails_clearly(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference / "ckpt", ckpt)
    (ckpt / "step_00000004" / "trainer_state.json").write_text("{")
    result = _run(
        "training.train_steps=6",
        f"logging.output_dir={tmp_path / 'run'}",
        f"checkpoint.load_dir={ckpt / 'step_00000004'}",
    )
    assert result.returncode == 2
    assert "step_00000004" in result.log and "cannot be loaded" in result.log


def _sigterm_after_two_steps(tmp_path: Path, marker: Path, *overrides: str) -> tuple:
    """Start a run, send SIGTERM once two steps are logged; its exit code and output."""
    run = next(Path(o.split("=", 1)[1]) for o in overrides if o.startswith("logging.output_dir="))
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block it
        process = subprocess.Popen(
            [*TRAIN, *overrides],
            cwd=REPO,
            stdout=log,
            stderr=log,
            env=dict(_env(), MM1_PREEMPTION_MARKER=str(marker)),
        )
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (
            metrics.exists() and metrics.read_text().count("\n") >= 2
        ):
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=300)
    return process.returncode, log_path.read_text()


def test_sigterm_saves_exits_75_and_resume_continues_exactly(reference, tmp_path):
    steps = f"training.train_steps={REFERENCE_STEPS}"
    ckpt, run, marker = tmp_path / "ckpt", tmp_path / "run", tmp_path / "preempted.json"
    returncode, output = _sigterm_after_two_steps(
        tmp_path, marker, steps, f"logging.output_dir={run}", f"checkpoint.save_dir={ckpt}"
    )
    assert returncode == EXIT_PREEMPTED, output[-3000:]
    stopped_at = layout.step_of(layout.read_latest(ckpt))
    assert 2 <= stopped_at < REFERENCE_STEPS
    # The marker a batch script requeues on (torchrun hides the exit code 75).
    assert json.loads(marker.read_text()) == {"step": stopped_at, "checkpoint_dir": str(ckpt)}
    layout.verify_manifest(layout.read_latest(ckpt))
    result = _run(
        steps, f"logging.output_dir={run}", f"checkpoint.save_dir={ckpt}"
    )  # auto-resume from save_dir
    assert result.returncode == 0, result.log[-3000:]
    # Every step, before and after the preemption, equals the uninterrupted run's.
    assert _losses(run) == _losses(reference / "run")


# A rank killed during a step: tests/cluster/test_multinode.py, where torchrun restarts
# the group (--max-restarts) and it resumes from the newest checkpoint.
@pytest.mark.parametrize("moment", ["checkpoint_write"])
def test_killed_rank_ends_the_job_promptly_and_latest_stays_valid(tmp_path, moment):
    ckpt = tmp_path / "ckpt"
    interval = "1" if moment == "checkpoint_write" else "3"
    job = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *TRAIN[1:],
            "training.train_steps=200",
            "parallel.tensor_parallel_size=2",
            f"logging.output_dir={tmp_path / 'run'}",
            f"checkpoint.save_dir={ckpt}",
            f"checkpoint.save_interval={interval}",
            "checkpoint.keep_last=2",
            "parallel.collective_timeout_minutes=0.5",
        ],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(layout.complete_checkpoints(ckpt)) < 1:
        time.sleep(0.1)
    if moment == "checkpoint_write":
        while time.monotonic() < deadline and not list(ckpt.glob(".tmp-step_*")):
            time.sleep(0.01)
    workers = [
        p
        for p in psutil.Process(job.pid).children(recursive=True)
        if "mm1_megatron.train" in " ".join(p.cmdline())
    ]
    assert len(workers) == 2
    # The checkpoint writer's result-queue manager dies with its rank (PR_SET_PDEATHSIG);
    # any other helper may already be gone or outlive it, so reap what is left.
    helpers = workers[1].children(recursive=True)
    killed_at = time.monotonic()
    workers[1].send_signal(signal.SIGKILL)
    job.wait(timeout=120)
    kill_left_over(helpers, grace_s=10)
    assert job.returncode != 0
    assert time.monotonic() - killed_at < 60
    latest = layout.read_latest(ckpt)
    layout.verify_manifest(latest)
    resume_steps = layout.step_of(latest) + 1
    result = _run(
        f"training.train_steps={resume_steps}",
        "optimizer.schedule_on_resume=checkpoint",  # the killed run planned 200 steps
        f"logging.output_dir={tmp_path / 'r'}",
        f"checkpoint.save_dir={ckpt}",
        "checkpoint.keep_last=2",
    )
    # A single process resumes the TP=2 checkpoint (resharding) for one more step.
    assert result.returncode == 0, result.log[-3000:]
    assert list(_losses(tmp_path / "r")) == [resume_steps]


def test_sigterm_without_a_save_dir_stops_without_claiming_a_checkpoint(tmp_path):
    from mm1_megatron.training.preemption import EXIT_STOPPED_UNSAVED

    marker = tmp_path / "preempted.json"
    returncode, output = _sigterm_after_two_steps(
        tmp_path, marker, "training.train_steps=200", f"logging.output_dir={tmp_path / 'run'}"
    )
    assert returncode == EXIT_STOPPED_UNSAVED != EXIT_PREEMPTED, output[-3000:]
    assert "no checkpoint was written" in output
    assert "checkpoint written" not in output
    assert not marker.exists()
