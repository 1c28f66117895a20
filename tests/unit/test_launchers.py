"""How rank, world size and local rank are read from each launcher's environment."""

from __future__ import annotations

import pytest

from mm1_megatron.config import ParallelConfig
from mm1_megatron.parallel.distributed import _launcher_env, check_world_size

LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "PMI_RANK",
    "PMI_SIZE",
    "MPI_LOCALRANKID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (5, 8, 1, "torchrun")),
        (
            {
                "OMPI_COMM_WORLD_RANK": "3",
                "OMPI_COMM_WORLD_SIZE": "4",
                "OMPI_COMM_WORLD_LOCAL_RANK": "3",
            },
            (3, 4, 3, "mpi"),
        ),
        ({"PMI_RANK": "2", "PMI_SIZE": "16", "MPI_LOCALRANKID": "2"}, (2, 16, 2, "mpi")),
        ({"SLURM_PROCID": "9", "SLURM_NTASKS": "64", "SLURM_LOCALID": "1"}, (9, 64, 1, "mpi")),
        ({}, (0, 1, 0, "none")),
    ],
)
def test_auto_detects_the_launcher(clean_env, env, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert _launcher_env("auto") == expected


def test_torchrun_variables_win_over_slurm(clean_env):
    # torchrun started by srun: SLURM_PROCID is the node's task, RANK the process.
    for name, value in {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
    }.items():
        clean_env.setenv(name, value)
    assert _launcher_env("auto") == (9, 16, 1, "torchrun")


def test_launcher_none_ignores_the_environment(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "1")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert _launcher_env("none") == (0, 1, 0, "none")


@pytest.mark.parametrize(
    "launcher, hint", [("torchrun", "torchrun --nproc-per-node"), ("mpi", "mpiexec -n")]
)
def test_explicit_launcher_without_its_variables_fails_clearly(clean_env, launcher, hint):
    with pytest.raises(ValueError, match=hint):
        _launcher_env(launcher)


def test_world_size_message_shows_the_arithmetic():
    parallel = ParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match=r"4 x 2 = 8"):
        check_world_size(parallel, 12)
    assert check_world_size(parallel, 16) == 2


def test_expert_layout_must_fit_data_and_tensor_parallel():
    parallel = ParallelConfig(tensor_parallel_size=1, expert_parallel_size=4)
    with pytest.raises(ValueError, match="expert_parallel_size"):
        check_world_size(parallel, 2)
    assert check_world_size(parallel, 8) == 8


def test_megatron_groups_get_the_configured_timeout(megatron_single_process, monkeypatch):
    """Megatron-Core's TP/PP/DP/EP groups default to 30 minutes whatever the world group
    uses; the configured limit must reach them too."""
    from megatron.core import parallel_state

    from mm1_megatron.parallel.distributed import init_distributed

    seen = {}
    monkeypatch.setattr(parallel_state, "model_parallel_is_initialized", lambda: False)
    monkeypatch.setattr(
        parallel_state, "initialize_model_parallel", lambda **kwargs: seen.update(kwargs)
    )
    init_distributed(ParallelConfig(), timeout_minutes=7.5)
    assert seen["distributed_timeout_minutes"] == 7.5


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 5, 5), (1, 5, 0), (2, 0, 0)])
def test_each_process_gets_a_visible_gpu(monkeypatch, visible, local_rank, expected):
    import torch

    from mm1_megatron.parallel.distributed import local_cuda_device_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert local_cuda_device_index(local_rank) == expected


def test_more_local_ranks_than_gpus_fails_clearly(monkeypatch):
    import torch

    from mm1_megatron.parallel.distributed import local_cuda_device_index

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="local rank 5 has no GPU: 4 are visible"):
        local_cuda_device_index(5)
