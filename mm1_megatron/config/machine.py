"""What this machine decides about a run's model: the layer implementation
(``model.transformer_impl=auto``) and FP8 (``model.fp8_on_gpu``), for training
(``training/runtime.py``) and evaluation (``evaluation/model.py``) alike."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import List, Optional, Tuple

from mm1_megatron.config.schema import MM1Config

logger = logging.getLogger(__name__)


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


FP8_MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper and newer


def transformer_engine_version() -> Optional[str]:
    """Transformer Engine's version when ``transformer_engine.pytorch`` imports, else None
    (not installed, or an install that fails to load, e.g. against another CUDA)."""
    if not installed("transformer_engine"):
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
