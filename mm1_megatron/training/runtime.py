"""What this machine and this start decide about how the model is built: the layer
implementation and FP8 (``model.transformer_impl=auto``, ``model.fp8_on_gpu``), dtype, where
weights are first drawn, and which fused kernels run. See docs/gpu.md for each choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mm1_megatron.config import MM1Config
from mm1_megatron.config.machine import (  # noqa: F401 (re-exported)
    FP8_MIN_CAPABILITY,
    installed,
    resolve_machine_settings,
    transformer_engine_version,
)
from mm1_megatron.models import RuntimeOptions

logger = logging.getLogger(__name__)


_installed = installed  # (monkeypatched by tests)


@dataclass(frozen=True)
class BuildChoices:
    runtime: RuntimeOptions
    init_seed: Optional[int]  # None: weights drawn per shard on the GPU (layout-dependent)


def resolve_init_device(setting: str, *, cuda: bool, resuming: bool) -> str:
    """``training.init_device``: auto draws on the GPU only when a checkpoint will replace
    the weights anyway, so a fresh run keeps the layout-independent CPU draw."""
    if setting == "auto":
        return "gpu" if cuda and resuming else "cpu"
    return setting


def resolve_build_choices(
    cfg: MM1Config, *, cuda: bool, bf16: bool, resuming: bool
) -> BuildChoices:
    fused = cfg.training.fused_kernels
    fused = cuda if fused is None else fused
    init_device = resolve_init_device(cfg.training.init_device, cuda=cuda, resuming=resuming)
    runtime = RuntimeOptions(
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=init_device == "cpu",
        fused_kernels=fused,
        # Megatron-Core's fused RoPE is Transformer Engine's kernel.
        apply_rope_fusion=fused and cuda and _installed("transformer_engine"),
        # The fused weight-gradient GEMM is apex's CUDA extension.
        gradient_accumulation_fusion=fused
        and cuda
        and _installed("fused_weight_gradient_mlp_cuda"),
    )
    logger.info(
        "model build: weights drawn on %s, fused kernels %s (RoPE %s, grad-accumulation %s, "
        "cross-entropy %s)",
        init_device,
        "on" if fused else "off",
        "on" if runtime.apply_rope_fusion else "off",
        "on" if runtime.gradient_accumulation_fusion else "off",
        runtime.cross_entropy_fusion_impl if fused and bf16 else "unfused",
    )
    init_seed = cfg.training.seed if init_device == "cpu" else None
    return BuildChoices(runtime=runtime, init_seed=init_seed)
