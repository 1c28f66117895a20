"""Process-group setup: one entry point for torchrun, MPI launchers and plain ``python``.

The launcher only decides how rank, world size and the rendezvous address are found;
after that every run is the same: ``torch.distributed`` (NCCL on GPU, gloo on CPU) and
Megatron-Core's ``parallel_state`` with TP x CP x PP x DP (EP inside DP x CP x TP).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from mm1_megatron.compat.install import install_patches
from mm1_megatron.config.layout import check_world_size
from mm1_megatron.config.schema import ParallelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launcher_env(launcher: str) -> tuple:
    """(rank, world_size, local_rank, found_by) from what the launcher left in the env."""
    env = os.environ
    if launcher in ("auto", "torchrun") and "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun"
    if launcher == "torchrun":
        raise ValueError(
            "parallel.launcher=torchrun but RANK/WORLD_SIZE are not set; "
            "start with `torchrun --nproc-per-node N ...`"
        )
    if launcher in ("auto", "mpi"):
        for rank_key, size_key, local_key in _MPI_ENV_KEYS:
            if rank_key in env and size_key in env:
                return int(env[rank_key]), int(env[size_key]), int(env.get(local_key, 0)), "mpi"
    if launcher == "mpi":
        raise ValueError(
            "parallel.launcher=mpi but no MPI rank variables were found; "
            "start with `mpiexec -n N ...` or `srun ...`"
        )
    return 0, 1, 0, "none"


# (rank, size, local rank) variables set by Open MPI, MPICH/Intel MPI (PMI) and SLURM srun.
_MPI_ENV_KEYS = (
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


def _agree_on_master_address_with_mpi() -> None:
    """Rank 0 publishes its host and a free port to every rank through MPI."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ValueError(
            "an MPI launch without MASTER_ADDR/MASTER_PORT needs mpi4py to agree "
            "on a rendezvous address: `pip install -e .[mpi]`, or export "
            "MASTER_ADDR and MASTER_PORT"
        ) from exc
    comm = MPI.COMM_WORLD
    address = None
    if comm.Get_rank() == 0:
        host = os.environ.get("MASTER_ADDR") or socket.gethostname()
        address = (host, os.environ.get("MASTER_PORT") or str(_free_port()))
    host, port = comm.bcast(address, root=0)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = host, port


def _set_rendezvous(world_size: int, found_by: str) -> None:
    if (
        found_by == "mpi"
        and world_size > 1
        and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ)
    ):
        _agree_on_master_address_with_mpi()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if world_size > 1:
            raise ValueError("MASTER_PORT is not set for a multi-process run")
        os.environ["MASTER_PORT"] = str(_free_port())


def _elastic_attempt_store(
    rank: int, world_size: int, timeout: datetime.timedelta
) -> Optional[dist.Store]:
    """Under torchrun, the store of this restart attempt (None otherwise: ``env://``).

    torchrun's c10d rendezvous hands every worker group, the first and each one it
    restarts (``--max-restarts``), the same store server and no per-attempt key prefix, so
    a restarted group's process groups read the addresses the killed group published and
    fail to connect. Keys scoped by ``TORCHELASTIC_RESTART_COUNT`` keep attempts apart.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        return None
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size=world_size,
        is_master=not agent_hosts_store and rank == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"mm1_megatron/attempt_{restart}", store)


def local_cuda_device_index(local_rank: int) -> int:
    """The CUDA device of this process: its local rank, or 0 when the launcher gives each
    task a single visible GPU (SLURM ``--gpus-per-task=1``, cgroup-bound devices)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} has no GPU: {count} are visible to this "
            f"process; start at most {count} processes per node, or bind one "
            "GPU per task (e.g. srun --gpus-per-task=1)"
        )
    return local_rank


def init_distributed(
    parallel: ParallelConfig, *, timeout_minutes: float = 30.0, force_cpu: bool = False
) -> DistributedContext:
    """Initialise torch.distributed and Megatron-Core's model-parallel groups.

    ``force_cpu`` keeps CPU-only work (checkpoint conversion) off the GPU on a GPU host:
    gloo, CPU tensors and no CUDA context, exactly as on a machine without CUDA.
    """
    cuda = torch.cuda.is_available() and not force_cpu
    install_patches(cuda_available=cuda)
    rank, world_size, local_rank, found_by = _launcher_env(parallel.launcher)
    check_world_size(parallel, world_size)
    _set_rendezvous(world_size, found_by)
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", local_cuda_device_index(local_rank))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            store=_elastic_attempt_store(rank, world_size, timeout),
        )
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
            expert_model_parallel_size=parallel.expert_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
            # The same limit for Megatron-Core's TP/PP/DP/EP groups as for the world group.
            distributed_timeout_minutes=timeout_minutes,
        )
    return DistributedContext(rank, world_size, local_rank, device, backend)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch identically on every rank, then Megatron's TP RNG.

    Parameters drawn on the CPU (``use_cpu_initialization``) come from the default CPU
    generator; seeding it the same everywhere keeps replicated parameters identical
    across tensor-parallel ranks and equal to a single-process run.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.default_generator.manual_seed(seed)


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
