"""Cluster launch files (SLURM with pyxis, JobSet, Kubeflow TrainJob, Dockerfile) rendered
from the same stacked config files as the training run; ``mm1 launch`` (``cli.py``).
Imports neither torch nor Megatron-Core."""

from mm1_megatron.launch.checks import check_rendered
from mm1_megatron.launch.plan import LaunchPlan, Layout, check_layout, plan_launch
from mm1_megatron.launch.render import TARGETS, render_files, write_rendered
from mm1_megatron.launch.settings import ClusterConfig, load_launch_config

__all__ = [
    "TARGETS",
    "ClusterConfig",
    "LaunchPlan",
    "Layout",
    "check_layout",
    "check_rendered",
    "load_launch_config",
    "plan_launch",
    "render_files",
    "write_rendered",
]
