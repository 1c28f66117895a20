"""``cluster/slurm_mm1.sbatch`` with stand-in ``srun`` and ``scontrol``: a preempted run
(marker written) requeues the job whatever exit code srun reports; any other failure does
not; overrides with spaces and quotes reach the workers unchanged."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

# Starts processes (scripts, launchers, tools): the slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "slurm_mm1.sbatch"

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; fi
"""

# Records the worker command line (one argument per line), then behaves as $FAKE_WORKER
# says: like the real workers after a preemption checkpoint (marker, then 75, which a
# launcher in between may turn into 1), a crash, or a finished run.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_ARGS"
echo "srun MASTER_ADDR=$MASTER_ADDR" >> "$FAKE_LOG"
case "$FAKE_WORKER" in
  preempted) echo '{"step": 7}' > "$MM1_PREEMPTION_MARKER"; exit 75 ;;
  preempted_exit_1) echo '{"step": 7}' > "$MM1_PREEMPTION_MARKER"; exit 1 ;;
  crashed) exit 1 ;;
  finished) exit 0 ;;
esac
"""


def _stand_in(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize(
    "worker, exit_code, requeued",
    [
        ("preempted", 0, True),
        ("preempted_exit_1", 0, True),
        ("crashed", 1, False),
        ("finished", 0, False),
    ],
)
def test_requeue_follows_the_preemption_marker(tmp_path, worker, exit_code, requeued):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "scontrol", FAKE_SCONTROL)
    _stand_in(bin_dir, "srun", FAKE_SRUN)
    log, args = tmp_path / "log.txt", tmp_path / "args.txt"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_SUBMIT_DIR=str(tmp_path),
        FAKE_LOG=str(log),
        FAKE_ARGS=str(args),
        FAKE_WORKER=worker,
    )
    env.pop("MM1_PREEMPTION_MARKER", None)
    overrides = [
        "--config",
        "configs/mm1_30b.yaml",
        "logging.output_dir=/runs/with space",
        "data.mixture={caption: 0.5, 'text': 0.5}",
    ]
    result = subprocess.run(
        ["bash", str(SCRIPT), *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == exit_code, result.stderr
    calls = log.read_text()
    assert ("scontrol requeue 4242" in calls) == requeued
    assert "srun MASTER_ADDR=node-a" in calls
    assert args.read_text().splitlines()[-len(overrides) :] == overrides
    assert not (tmp_path / ".mm1_preempted_4242").exists()  # consumed (or never written)


def test_a_stale_marker_from_an_earlier_run_is_ignored(tmp_path):
    (tmp_path / ".mm1_preempted_4242").write_text('{"step": 1}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "scontrol", FAKE_SCONTROL)
    _stand_in(bin_dir, "srun", FAKE_SRUN)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-a",
        SLURM_SUBMIT_DIR=str(tmp_path),
        FAKE_LOG=str(tmp_path / "log.txt"),
        FAKE_ARGS=str(tmp_path / "args.txt"),
        FAKE_WORKER="crashed",
    )
    env.pop("MM1_PREEMPTION_MARKER", None)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--config", "configs/debug.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "requeue" not in (tmp_path / "log.txt").read_text()


def test_multinode_torchrun_without_master_addr_fails_fast(tmp_path):
    env = dict(os.environ, NNODES="8")
    env.pop("MASTER_ADDR", None)
    result = subprocess.run(
        ["bash", str(REPO / "cluster" / "torchrun_multinode.sh"), "--config", "configs/debug.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "NNODES=8 needs MASTER_ADDR" in result.stderr
