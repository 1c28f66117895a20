"""How a world of processes splits into TP x CP x PP x DP (EP within DP x CP x TP).

Pure arithmetic on the config, without torch, so that ``init_distributed`` (at start-up)
and ``mm1 launch`` (before a job is submitted) refuse the same layouts with the same
messages.
"""

from __future__ import annotations

from mm1_megatron.config.schema import ParallelConfig


def check_world_size(parallel: ParallelConfig, world_size: int) -> int:
    """Return the data-parallel size, or explain why ``world_size`` does not factor."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    cp = parallel.context_parallel_size
    model_parallel = tp * cp * pp
    if world_size % model_parallel:
        names, sizes = "tensor_parallel_size x pipeline_parallel_size", f"{tp} x {pp}"
        if cp > 1:
            names = "tensor_parallel_size x context_parallel_size x pipeline_parallel_size"
            sizes = f"{tp} x {cp} x {pp}"
        raise ValueError(
            f"world size {world_size} is not divisible by {names} = {sizes} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes"
        )
    data_parallel = world_size // model_parallel
    ep = parallel.expert_parallel_size
    etp = parallel.expert_tensor_parallel_size or tp
    if (data_parallel * cp * tp) % (ep * etp):
        raise ValueError(
            f"expert_parallel_size x expert_tensor_parallel_size = {ep} x {etp} must divide "
            f"data_parallel x context_parallel x tensor_parallel = {data_parallel} x {cp} x "
            f"{tp} (world {world_size} = TP {tp} x CP {cp} x PP {pp} x DP {data_parallel})"
        )
    return data_parallel


def num_microbatches(global_batch_size: int, micro_batch_size: int, data_parallel: int) -> int:
    """Micro-batches each data-parallel rank accumulates per step (the trainer's rule)."""
    per_step = micro_batch_size * data_parallel
    if global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={global_batch_size} must be a multiple "
            f"of micro_batch_size x data_parallel = {micro_batch_size} x "
            f"{data_parallel} = {per_step}"
        )
    return global_batch_size // per_step
