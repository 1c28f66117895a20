"""Logging for entry points: INFO on rank 0 (and on the rank that logs the training
metrics, ``log_info_on_this_rank``), warnings and errors elsewhere."""

from __future__ import annotations

import logging
import os
import warnings

# Megatron-Core announces each missing optional accelerator at import time. The choice of
# implementation is ours and explicit in the config, so these repeat nothing useful.
_FALLBACK_WARNINGS = (
    r".*(Apex|Transformer Engine).* not installed.*",
    r".*full scope is deprecated.*",
    r".*moe_ffn_hidden_size is not set.*",
    r".*is deprecated. Please use `torch.distributed.*",
    r".*\.grad attribute of a Tensor that is not a leaf.*",
)


def setup_logging(level: int = logging.INFO) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for pattern in _FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.WARNING)


def log_info_on_this_rank() -> None:
    """Show INFO from this rank too: the per-step lines come from the last pipeline
    stage, which is not global rank 0 when pipeline parallelism is on."""
    root = logging.getLogger()
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
