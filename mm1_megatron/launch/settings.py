"""The ``cluster:`` section: where and how a run is launched, read by ``mm1 launch`` only.

It lives in the same stacked YAML files as the training config (a cluster overlay on a
model config), but not in the training schema: the trainer never needs it (it reads
rank, world size and rendezvous from its launcher) and skips it
(``config.loader.LAUNCHER_SECTIONS``). Fields are checked with the config loader's own
type checks and messages (``cluster.nodes: expected an integer, ...``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from mm1_megatron.config.loader import (
    apply_overrides,
    config_from_dict,
    read_config_trees,
    section_from_dict,
)
from mm1_megatron.config.schema import MM1Config

SECTION = "cluster"
# Exported for every worker unless cluster.env (or, for SLURM, the submitting shell) sets
# PYTORCH_CUDA_ALLOC_CONF: the ViT batch's size changes every micro-batch, which fragments
# PyTorch's CUDA caching allocator; expandable segments grow in place instead.
CUDA_ALLOC_CONF = "expandable_segments:True"


@dataclass
class Mount:
    """A folder seen inside the container (data, checkpoints, the run's outputs)."""

    host_path: str = ""  # SLURM: the path on the nodes; Kubernetes: a hostPath (no claim)
    container_path: str = ""
    claim: Optional[str] = None  # Kubernetes: a PersistentVolumeClaim instead of a hostPath
    read_only: bool = False


@dataclass
class ContainerSettings:
    # The image the jobs run: built from the rendered Dockerfile and pushed here.
    image: str = "registry.example.com/mm1:latest"
    # The pinned NGC PyTorch base (torch, Transformer Engine, apex, NCCL); Python 3.12.
    base_image: str = "nvcr.io/nvidia/pytorch:26.07-py3"
    megatron_core: str = "0.19.2"  # installed into the image (0.17+ needs Python 3.12)
    workdir: str = "/workspace/mm1"  # the repository copy in the image: configs resolve here
    mounts: List[Mount] = field(default_factory=list)


@dataclass
class SlurmSettings:
    partition: Optional[str] = None
    account: Optional[str] = None
    time_limit: Optional[str] = None  # sbatch --time, e.g. "48:00:00"
    # pyxis image: None derives it from container.image (registry#repo:tag); or a .sqsh path
    image: Optional[str] = None
    extra_sbatch: List[str] = field(default_factory=list)  # e.g. ["--qos=high"]


@dataclass
class KubernetesSettings:
    namespace: str = "default"
    shm_size: str = "64Gi"  # /dev/shm: an in-memory emptyDir (data workers, NCCL)
    # RDMA device-plugin resource (e.g. rdma/ib, nvidia.com/hostdev) and count per pod;
    # None: no RDMA resource and no IPC_LOCK capability (NCCL then uses TCP sockets).
    rdma_resource: Optional[str] = None
    rdma_per_node: int = 1
    node_selector: Dict[str, str] = field(default_factory=dict)
    pod_annotations: Dict[str, str] = field(default_factory=dict)  # e.g. secondary networks
    service_account: Optional[str] = None
    image_pull_secret: Optional[str] = None


@dataclass
class ClusterConfig:
    job_name: str = "mm1"  # SLURM job name; JobSet / TrainJob name (DNS label)
    nodes: int = 1
    gpus_per_node: int = 8
    rdzv_port: int = 29500
    # Restarts of the whole job after a failure (torchrun on SLURM, JobSet/TrainJob
    # failurePolicy on Kubernetes); each restart resumes from the newest checkpoint.
    max_restarts: int = 0
    # Seconds between the stop signal and the kill: SLURM's --signal=USR1@N before the
    # time limit, the pods' terminationGracePeriodSeconds, torchrun's --shutdown-timeout.
    # The preemption checkpoint must be written within it.
    stop_grace_seconds: int = 120
    env: Dict[str, str] = field(default_factory=dict)  # NCCL_* and friends, for every worker
    container: ContainerSettings = field(default_factory=ContainerSettings)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    kubernetes: KubernetesSettings = field(default_factory=KubernetesSettings)


@dataclass(frozen=True)
class LaunchInputs:
    """What ``mm1 launch render`` was given, as the rendered files pass it on."""

    configs: Tuple[str, ...]
    overrides: Tuple[str, ...]  # all of them, cluster.* included

    @property
    def training_overrides(self) -> List[str]:
        """The overrides the trainer gets (it skips the cluster section anyway)."""
        return [o for o in self.overrides if not o.strip().startswith(f"{SECTION}.")]

    def config_args(self) -> List[str]:
        """``--config A --config B``."""
        return [arg for path in self.configs for arg in ("--config", path)]

    def training_args(self) -> List[str]:
        """``--config A --config B overrides...``: the trainer's command-line arguments."""
        return self.config_args() + self.training_overrides


def _stringify_env(tree: dict) -> dict:
    # YAML reads NCCL_IB_TIMEOUT: 22 as a number; environment values are strings.
    env = tree.get("env")
    if isinstance(env, dict):
        tree = dict(tree)
        tree["env"] = {
            k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for k, v in env.items()
        }
    return tree


def load_launch_config(
    configs: Sequence[str], overrides: Sequence[str] = ()
) -> Tuple[MM1Config, ClusterConfig]:
    """The training config and the cluster settings from the same stacked files."""
    tree = apply_overrides(read_config_trees(list(configs)), overrides)
    cluster_tree = tree.pop(SECTION, None) or {}
    cluster = section_from_dict(ClusterConfig, _stringify_env(cluster_tree), SECTION)
    return config_from_dict(tree), cluster


_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the launchers themselves (torchrun, the Kubeflow Trainer, the rendered scripts).
RESERVED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MAX_JOB_NAME = 40  # pods are <name>-node-0-<i>; host names must stay within 63 characters


def cluster_problems(cluster: ClusterConfig) -> List[str]:
    """Every problem with the cluster settings, each naming its field and the fix."""
    p, problems = SECTION, []
    for name in ("nodes", "gpus_per_node", "stop_grace_seconds"):
        if getattr(cluster, name) < 1:
            problems.append(f"{p}.{name}={getattr(cluster, name)} must be >= 1")
    if cluster.max_restarts < 0:
        problems.append(f"{p}.max_restarts={cluster.max_restarts} must be >= 0")
    if not 1 <= cluster.rdzv_port <= 65535:
        problems.append(f"{p}.rdzv_port={cluster.rdzv_port} must be a port (1-65535)")
    if not _DNS_LABEL.match(cluster.job_name) or len(cluster.job_name) > MAX_JOB_NAME:
        problems.append(
            f"{p}.job_name={cluster.job_name!r} must be a DNS label of at most "
            f"{MAX_JOB_NAME} characters (lower-case letters, digits and '-', starting with "
            "a letter): Kubernetes names the pods after it"
        )
    for name in cluster.env:
        if not _ENV_NAME.match(name):
            problems.append(f"{p}.env: {name!r} is not an environment variable name")
        elif name in RESERVED_ENV or name.startswith("PET_"):
            problems.append(
                f"{p}.env.{name} is set by the launcher (torchrun, the Kubeflow Trainer); remove it"
            )
    container = cluster.container
    for name in ("image", "base_image", "megatron_core", "workdir"):
        if not getattr(container, name):
            problems.append(f"{p}.container.{name} must not be empty")
    if ":" not in container.base_image.rsplit("/", 1)[-1] or container.base_image.endswith(
        ":latest"
    ):
        problems.append(
            f"{p}.container.base_image={container.base_image!r} must name a pinned tag, "
            "e.g. nvcr.io/nvidia/pytorch:26.07-py3"
        )
    for i, mount in enumerate(container.mounts):
        where = f"{p}.container.mounts[{i}]"
        if not mount.container_path.startswith("/"):
            problems.append(f"{where}.container_path must be an absolute path")
        if mount.claim is None and not mount.host_path.startswith("/"):
            problems.append(f"{where}.host_path must be an absolute path (or set a claim)")
    if cluster.kubernetes.rdma_per_node < 1:
        problems.append(f"{p}.kubernetes.rdma_per_node must be >= 1")
    return problems + _verbatim_problems(cluster)


def _verbatim_problems(cluster: ClusterConfig) -> List[str]:
    """Values written as they are into #SBATCH lines, FROM, pyxis options: one word each
    (a newline there would start a new instruction); mount paths without , or :."""
    c, s, k = cluster.container, cluster.slurm, cluster.kubernetes
    words = {
        "container.image": c.image,
        "container.base_image": c.base_image,
        "container.megatron_core": c.megatron_core,
        "container.workdir": c.workdir,
        "slurm.partition": s.partition,
        "slurm.account": s.account,
        "slurm.time_limit": s.time_limit,
        "slurm.image": s.image,
        "kubernetes.namespace": k.namespace,
        "kubernetes.shm_size": k.shm_size,
        "kubernetes.rdma_resource": k.rdma_resource,
        **{f"slurm.extra_sbatch[{i}]": v for i, v in enumerate(s.extra_sbatch)},
    }
    problems = [
        f"{SECTION}.{name}={value!r} must be a single word (no spaces or line breaks)"
        for name, value in words.items()
        if value is not None and any(ch.isspace() for ch in value)
    ]
    for i, mount in enumerate(c.mounts):
        for name in ("host_path", "container_path"):
            value = getattr(mount, name)
            if any(ch in value for ch in ",:\n\r"):
                problems.append(
                    f"{SECTION}.container.mounts[{i}].{name}={value!r}: no , or : or line "
                    "breaks (pyxis separates mounts with them)"
                )
    return problems
