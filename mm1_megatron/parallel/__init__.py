"""Distributed setup and CPU execution for Megatron-Core."""

from mm1_megatron.compat import cpu_execution_enabled, enable_cpu_execution
from mm1_megatron.parallel.distributed import (
    DistributedContext,
    check_world_size,
    init_distributed,
    seed_everything,
    shutdown_distributed,
)

__all__ = [
    "DistributedContext",
    "check_world_size",
    "cpu_execution_enabled",
    "enable_cpu_execution",
    "init_distributed",
    "seed_everything",
    "shutdown_distributed",
]
