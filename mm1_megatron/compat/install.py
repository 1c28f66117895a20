"""Start-up: check the versions, install the patches this process needs, log them once."""

from __future__ import annotations

from typing import List

from mm1_megatron.compat import optimizer
from mm1_megatron.compat.cpu import enable_cpu_execution
from mm1_megatron.compat.patching import Patch, active_patches, define_missing, log_active_patches
from mm1_megatron.compat.versions import check_supported_mcore


def _define_missing_te_gemm() -> None:
    # megatron-core 0.16 references te_general_gemm in the MoE router whether or not
    # Transformer Engine imported (NameError without TE, on CPU and GPU); 0.19 defines it
    # as None itself, so nothing is added there.
    from megatron.core.transformer.moe import moe_utils

    define_missing(
        moe_utils,
        "te_general_gemm",
        None,
        reason="the MoE router references it without Transformer Engine",
        written_for="megatron-core 0.16.x without Transformer Engine",
    )


def install_patches(*, cuda_available: bool) -> List[Patch]:
    """Idempotent; call before building any Megatron-Core object. ``cuda_available=False``
    on a GPU host keeps the process on the CPU (the CUDA stand-ins are installed)."""
    check_supported_mcore()
    from mm1_megatron.compat.checkpointing import install_safe_loading
    from mm1_megatron.compat.writer_manager import install_orphan_free_writer_queue

    install_safe_loading()  # every process that may read a checkpoint, on CPU and GPU
    install_orphan_free_writer_queue()  # every process that may save one
    if not cuda_available:
        enable_cpu_execution(force=True)
    _define_missing_te_gemm()
    if optimizer.megatron_uses_torch_adam():
        optimizer.install_step_fix()
    log_active_patches()
    return active_patches()
