"""Sharded, atomic, reshardable checkpoints (Megatron-Core dist_checkpointing)."""

from mm1_megatron.checkpoint.layout import CorruptCheckpointError
from mm1_megatron.checkpoint.manager import (
    CheckpointManager,
    TrainingState,
    load_model_weights,
    resolve_checkpoint,
    unwrap,
)

__all__ = [
    "CheckpointManager",
    "CorruptCheckpointError",
    "TrainingState",
    "load_model_weights",
    "resolve_checkpoint",
    "unwrap",
]
