"""Sharded, atomic, reshardable checkpoints (Megatron-Core dist_checkpointing)."""

from mm1_megatron.checkpoint.layout import CorruptCheckpointError
from mm1_megatron.checkpoint.manager import CheckpointManager, TrainingState, unwrap

__all__ = ["CheckpointManager", "CorruptCheckpointError", "TrainingState", "unwrap"]
