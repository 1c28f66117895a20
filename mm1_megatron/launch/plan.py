"""Check a launch before anything is rendered: the training config (``validate_config``),
the cluster settings, and that nodes x GPUs per node factor into the parallel layout
(``config.layout``, the rules ``init_distributed`` applies at start-up)."""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import List, Sequence

from mm1_megatron.config.layout import check_world_size, num_microbatches
from mm1_megatron.config.schema import MM1Config
from mm1_megatron.config.validation import validate_config
from mm1_megatron.launch.settings import (
    ClusterConfig,
    LaunchInputs,
    cluster_problems,
    load_launch_config,
)

logger = logging.getLogger(__name__)

# torchrun forwards these to its workers (SIGUSR1: SLURM's warning before the time limit)
# and waits up to --shutdown-timeout for the preemption checkpoint before killing them.
# Both options are recent (pytorch/pytorch#160690, #172596); torch 2.13 has them.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    tensor: int
    pipeline: int
    data: int
    expert: int
    microbatches: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def describe(self) -> str:
        return (
            f"{self.nodes} nodes x {self.gpus_per_node} GPUs = {self.world_size} processes "
            f"= TP {self.tensor} x PP {self.pipeline} x DP {self.data} (EP {self.expert} "
            f"within DP), {self.microbatches} micro-batches per step"
        )


@dataclass(frozen=True)
class LaunchPlan:
    inputs: LaunchInputs
    cluster: ClusterConfig
    layout: Layout

    def header(self, target: str) -> List[str]:
        """Comment lines (without the comment marker) that open every rendered file."""
        command = shlex.join(
            ["mm1", "launch", "render", *self.inputs.config_args(), "--target", target]
            + ["--output", "DIR", *self.inputs.overrides]
        )
        command = command.replace("\n", "\\n").replace("\r", "\\r")  # stays a comment
        return [
            "Rendered by mm1 launch (mm1_megatron/launch); change the config files or the",
            "overrides and render again instead of editing this file:",
            f"  {command}",
            f"Layout: {self.layout.describe()}",
        ]

    def torchrun_args(self) -> List[str]:
        """torchrun's options and the trainer's arguments, rendezvous excluded."""
        return [
            f"--signals-to-handle={TORCHRUN_SIGNALS}",
            f"--shutdown-timeout={self.cluster.stop_grace_seconds}",
            "-m",
            "mm1_megatron.train",
            *self.inputs.training_args(),
        ]


def check_layout(cfg: MM1Config, cluster: ClusterConfig) -> Layout:
    """The layout of ``cluster.nodes x cluster.gpus_per_node`` processes, or a
    ``ValueError`` naming the fields that do not fit."""
    par, world = cfg.parallel, cluster.nodes * cluster.gpus_per_node
    where = (
        f"cluster.nodes x cluster.gpus_per_node = {cluster.nodes} x {cluster.gpus_per_node} "
        f"= {world} processes"
    )
    try:
        data = check_world_size(par, world)
        t = cfg.training
        micro = num_microbatches(t.global_batch_size, t.micro_batch_size, data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if par.tensor_parallel_size > cluster.gpus_per_node:
        logger.warning(
            "parallel.tensor_parallel_size=%d spans nodes (cluster.gpus_per_node=%d): "
            "tensor-parallel traffic then leaves NVLink",
            par.tensor_parallel_size,
            cluster.gpus_per_node,
        )
    return Layout(
        nodes=cluster.nodes,
        gpus_per_node=cluster.gpus_per_node,
        tensor=par.tensor_parallel_size,
        pipeline=par.pipeline_parallel_size,
        data=data,
        expert=par.expert_parallel_size,
        microbatches=micro,
    )


def _warn_about_config_paths(inputs: LaunchInputs, cluster: ClusterConfig) -> None:
    mounted = [m.container_path for m in cluster.container.mounts]
    for path in inputs.configs:
        posix = PurePosixPath(path)
        if posix.is_absolute():
            if not any(posix.is_relative_to(m) for m in mounted):
                logger.warning(
                    "--config %s is not under any cluster.container.mounts container_path: "
                    "the workers will not find it",
                    path,
                )
        elif posix.parts[0] not in ("configs", "cluster"):
            logger.warning(
                "--config %s: the image holds configs/ and cluster/ under %s; other relative "
                "paths are not found there",
                path,
                cluster.container.workdir,
            )


def plan_launch(configs: Sequence[str], overrides: Sequence[str] = ()) -> LaunchPlan:
    """Load, validate and lay out a launch; ``ValueError`` lists what is wrong."""
    if not configs:
        raise ValueError("give the model config and the cluster overlay with --config")
    inputs = LaunchInputs(tuple(str(c) for c in configs), tuple(overrides))
    cfg, cluster = load_launch_config(inputs.configs, inputs.overrides)
    validate_config(cfg)
    problems = cluster_problems(cluster)
    if problems:
        raise ValueError("Invalid cluster settings:\n  - " + "\n  - ".join(problems))
    layout = check_layout(cfg, cluster)
    _warn_about_config_paths(inputs, cluster)
    return LaunchPlan(inputs, cluster, layout)
