"""SLURM batch script: pyxis/enroot container, one torchrun per node.

Node count and GPUs per node come from the allocation (``SLURM_NNODES``,
``SLURM_GPUS_ON_NODE``), so ``sbatch --nodes 16`` on the same script doubles DP. The
preemption path is the one of ``cluster/slurm_mm1.sbatch``: the workers write
``$MM1_PREEMPTION_MARKER`` after their checkpoint and the script requeues the job when the
marker exists, because torchrun reports any failed worker as exit code 1 and 75 never
reaches the script.
"""

from __future__ import annotations

import shlex
from typing import List

from mm1_megatron.launch.plan import LaunchPlan
from mm1_megatron.launch.settings import CUDA_ALLOC_CONF, ClusterConfig

FILE_NAME = "slurm.sbatch"


def pyxis_image(cluster: ClusterConfig) -> str:
    """The image as pyxis names it: ``registry#repository:tag`` (or a .sqsh file)."""
    if cluster.slurm.image:
        return cluster.slurm.image
    image = cluster.container.image
    first, sep, rest = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return f"{first}#{rest}"
    return image


def _sbatch_options(cluster: ClusterConfig) -> List[str]:
    options = [
        f"--job-name={cluster.job_name}",
        f"--nodes={cluster.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={cluster.gpus_per_node}",
        "--exclusive",
        "--requeue",
        f"--signal=USR1@{cluster.stop_grace_seconds}",
    ]
    slurm = cluster.slurm
    for flag, value in (
        ("partition", slurm.partition),
        ("account", slurm.account),
        ("time", slurm.time_limit),
    ):
        if value:
            options.append(f"--{flag}={value}")
    return options + list(slurm.extra_sbatch)


def _mounts(cluster: ClusterConfig) -> str:
    specs = []
    for mount in cluster.container.mounts:
        if mount.host_path:  # claim-only mounts are Kubernetes volumes
            spec = f"{mount.host_path}:{mount.container_path}"
            specs.append(spec + (":ro" if mount.read_only else ""))
    return ",".join(specs)


def _quote(value: str) -> str:
    quoted = shlex.quote(value)
    # shellcheck reads a bare comma in an array element as a mistyped separator (SC2054).
    return f"'{value}'" if quoted == value and "," in value else quoted


def _literal_note(values: List[str]) -> List[str]:
    # A $ or ` inside single quotes is meant literally here (shellcheck's SC2016 asks).
    if any("$" in v or "`" in v for v in values):
        return ["# shellcheck disable=SC2016  # a literal $ or ` in a value"]
    return []


def _array(name: str, values: List[str]) -> List[str]:
    lines = [f"{name}=("] + [f"  {_quote(v)}" for v in values] + [")"]
    return _literal_note(values) + lines


def render_slurm(plan: LaunchPlan) -> str:
    cluster = plan.cluster
    lines = ["#!/usr/bin/env bash"]
    lines += [f"# {line}" for line in plan.header("slurm")]
    lines += [
        "#",
        "# Submit with `sbatch THIS_FILE [more section.field=value overrides]`.",
        "# Preemption: on SIGTERM, or on SIGUSR1 sent cluster.stop_grace_seconds before the",
        "# time limit, torchrun passes the signal to the workers; they write a checkpoint and",
        "# the marker $MM1_PREEMPTION_MARKER, and this script requeues the job, which resumes",
        "# from checkpoint.save_dir. Any other failure ends the job.",
    ]
    lines += [f"#SBATCH {option}" for option in _sbatch_options(cluster)]
    lines += [
        "set -uo pipefail",
        ': "${SLURM_JOB_ID:?submit this script with sbatch}"',
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT=${{MASTER_PORT:-{cluster.rdzv_port}}}",
        "# GPUs per node from the allocation (sbatch --gpus-per-node overrides the default).",
        f"GPUS_PER_NODE=${{SLURM_GPUS_ON_NODE:-{cluster.gpus_per_node}}}",
        "export MM1_PREEMPTION_MARKER=${MM1_PREEMPTION_MARKER:-"
        "${SLURM_SUBMIT_DIR:-$PWD}/.mm1_preempted_${SLURM_JOB_ID}}",
        'rm -f "$MM1_PREEMPTION_MARKER"',
        "# Mounted at the same path, so the workers in the container write where this",
        "# script looks.",
        'MARKER_DIR=$(dirname "$MM1_PREEMPTION_MARKER")',
        "# Megatron-Core's tensor/sequence-parallel communication overlap relies on one",
        "# hardware queue per GPU.",
        "export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}",
        "# The ViT's batch changes size every micro-batch, which fragments PyTorch's CUDA",
        "# caching allocator; expandable segments grow in place instead.",
        f"export PYTORCH_CUDA_ALLOC_CONF=${{PYTORCH_CUDA_ALLOC_CONF:-{CUDA_ALLOC_CONF}}}",
    ]
    for name, value in cluster.env.items():
        lines += _literal_note([value]) + [f"export {name}={_quote(value)}"]
    mounts = _mounts(cluster)
    marker_mount = '"$MARKER_DIR:$MARKER_DIR"'
    lines += [
        f"IMAGE={shlex.quote(pyxis_image(cluster))}",
        f"MOUNTS={_quote(mounts)},{marker_mount}" if mounts else f"MOUNTS={marker_mount}",
    ]
    lines += _array("TORCHRUN_ARGS", plan.torchrun_args())
    lines += [
        "",
        "# One torchrun per node; the c10d rendezvous runs on the first node of the job.",
        'srun --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 \\',
        '  --container-image="$IMAGE" --container-mounts="$MOUNTS" \\',
        f"  --container-workdir={shlex.quote(cluster.container.workdir)} \\",
        '  torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$GPUS_PER_NODE" \\',
        '    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\',
        f'    --rdzv-id="$SLURM_JOB_ID" --max-restarts={cluster.max_restarts} \\',
        '    "${TORCHRUN_ARGS[@]}" "$@"',
        "code=$?",
        "",
        'if [ -f "$MM1_PREEMPTION_MARKER" ]; then',
        '  echo "mm1: preempted ($(cat "$MM1_PREEMPTION_MARKER")); requeueing job'
        ' $SLURM_JOB_ID" >&2',
        '  rm -f "$MM1_PREEMPTION_MARKER"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"
