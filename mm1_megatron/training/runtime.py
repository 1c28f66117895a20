"""What this machine and this start decide about how the model is built: the layer
implementation and FP8 (``model.transformer_impl=auto``, ``model.fp8_on_gpu``), dtype, where
weights are first drawn, and which fused kernels run. See docs/gpu.md for each choice."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from mm1_megatron.config import MM1Config
from mm1_megatron.models import RuntimeOptions

logger = logging.getLogger(__name__)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper and newer


def transformer_engine_version() -> Optional[str]:
    """Transformer Engine's version when ``transformer_engine.pytorch`` imports, else None
    (not installed, or an install that fails to load, e.g. against another CUDA)."""
    if not _installed("transformer_engine"):
        return None
    try:
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to load means "not importable"
        logger.warning("Transformer Engine is installed but does not import: %s", exc)
        return None
    return str(getattr(transformer_engine, "__version__", "unknown version"))


def _capability(capability: Optional[Tuple[int, int]]) -> str:
    return "none (no GPU)" if capability is None else f"{capability[0]}.{capability[1]}"


def resolve_machine_settings(
    cfg: MM1Config,
    *,
    cuda: bool,
    cuda_capability: Optional[Tuple[int, int]],
    te_version: Optional[str],
) -> Tuple[MM1Config, List[str]]:
    """``cfg`` with ``model.transformer_impl=auto`` and ``model.fp8_on_gpu`` decided for this
    machine, and one log line per decision.

    auto becomes transformer_engine when Transformer Engine imports (``te_version``) and
    CUDA is available, else local. ``fp8_on_gpu`` becomes ``model.fp8`` when the resolved
    impl is transformer_engine on a GPU of compute capability 8.9+, else ``fp8`` stays
    null; either way ``fp8_on_gpu`` is cleared, so the returned config (what the run saves)
    holds only concrete values."""
    model = cfg.model
    impl, lines = model.transformer_impl, []
    if impl == "auto":
        if cuda and te_version is not None:
            impl, reason = "transformer_engine", f"TE {te_version}, CUDA"
        elif not cuda:
            impl, reason = "local", "no CUDA"
        else:
            impl, reason = "local", "CUDA, but Transformer Engine does not import"
        lines.append(f"model.transformer_impl=auto -> {impl} ({reason})")
    fp8 = model.fp8
    if model.fp8_on_gpu is not None:
        if impl != "transformer_engine":
            reason = f"transformer_impl={impl}"
        elif cuda_capability is None or tuple(cuda_capability) < FP8_MIN_CAPABILITY:
            reason = f"compute capability {_capability(cuda_capability)} < 8.9"
        else:
            fp8, reason = model.fp8_on_gpu, f"compute capability {_capability(cuda_capability)}"
        lines.append(f"model.fp8_on_gpu={model.fp8_on_gpu} -> model.fp8={fp8 or 'null'} ({reason})")
    if impl == model.transformer_impl and model.fp8_on_gpu is None:
        return cfg, lines
    resolved = dataclasses.replace(model, transformer_impl=impl, fp8=fp8, fp8_on_gpu=None)
    return dataclasses.replace(cfg, model=resolved), lines


def cross_entropy_fusion_impl(*, cuda: bool) -> str:
    """Megatron-Core's fused cross-entropy kernel: always "native" (which keeps an fp32
    softmax of ``[s, b, V/TP]`` for backward). Transformer Engine's ("te") would save that
    memory, but megatron-core 0.19.2 warns that it "has known stability issues" and
    Megatron-LM's argument validation rejects it by default
    (``model_parallel_config.py:536``); we follow megatron-core until it lifts that."""
    del cuda
    return "native"


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
        cross_entropy_fusion_impl=cross_entropy_fusion_impl(cuda=cuda),
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
