"""Checkpoints of LoRA runs (``model.lora``), and the starting weights a LoRA or DPO run
records.

They hold what the run trains (the adapters, any ``model.lora.fully_trained`` part, and
the optimizer state of those) and never the frozen base weights, which come from
``checkpoint.initial_weights`` on every start, resumes included. The base is recorded in
``adapter_base.json`` by its folder and a fingerprint (the SHA-256 of its manifest, which
lists the SHA-256 of every file), so a resume on another base is refused rather than
silently training adapters against other weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Set

from mm1_megatron.checkpoint.key_layout import is_extra_state
from mm1_megatron.checkpoint.loading import (
    ADAPTER_BASE_FILE,
    load_model_weights,
    load_module_state,
    load_sharded,
    resolve_checkpoint,
    unwrap,
    verify_before_loading,
)
from mm1_megatron.checkpoint.manifest import MANIFEST_FILE

logger = logging.getLogger(__name__)


def records_its_base(config) -> bool:
    """Whether a run's checkpoints record their starting weights (``adapter_base.json``):
    LoRA (the checkpoints hold no base), and DPO from ``initial_weights`` (its reference)."""
    preference = config.training.objective == "preference"
    return config.model.lora.enabled or (
        preference and config.checkpoint.initial_weights is not None
    )


def trained_keys(module) -> Set[str]:
    """State-dict keys of ``module``'s trained parameters."""
    return {name for name, param in module.named_parameters() if param.requires_grad}


def trained_state(model_state: Dict[str, Any], keys: Set[str]) -> Dict[str, Any]:
    """The entries of a model's sharded state dict a LoRA checkpoint holds: trained
    parameters, and Transformer Engine's extra state (FP8 scales: small, and evolving)."""
    return {k: v for k, v in model_state.items() if k in keys or is_extra_state(k)}


def base_fingerprint(folder: Path) -> Optional[str]:
    """SHA-256 of ``folder``'s manifest; None for a folder without one."""
    manifest = Path(folder) / MANIFEST_FILE
    if not manifest.is_file():
        return None
    return hashlib.sha256(manifest.read_bytes()).hexdigest()


def base_record(initial_weights: str) -> Dict[str, Optional[str]]:
    """What ``adapter_base.json`` says about the base ``initial_weights`` names."""
    folder = resolve_checkpoint(Path(initial_weights))
    return {"initial_weights": str(folder.resolve()), "fingerprint": base_fingerprint(folder)}


def write_base_record(checkpoint: Path, record: Dict[str, Optional[str]]) -> None:
    (Path(checkpoint) / ADAPTER_BASE_FILE).write_text(json.dumps(record, indent=1))


def read_base_record(checkpoint: Path) -> Optional[Dict[str, Optional[str]]]:
    file = Path(checkpoint) / ADAPTER_BASE_FILE
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"cannot read {file}: {exc}") from None
    if not isinstance(record, dict) or "initial_weights" not in record:
        raise ValueError(f"{file} does not name a base checkpoint (initial_weights)")
    return record


def check_same_base(checkpoint: Path, initial_weights: Optional[str]) -> None:
    """Refuse to resume (or read) ``checkpoint`` on other starting weights than it was
    trained from: a LoRA run's base, a DPO run's reference (``ValueError`` naming both)."""
    recorded = read_base_record(checkpoint)
    if recorded is None:
        raise ValueError(
            f"{checkpoint} has no {ADAPTER_BASE_FILE}: it was not written by a LoRA run or "
            "a DPO run from checkpoint.initial_weights; resume it with its own config"
        )
    if initial_weights is None:
        raise ValueError(
            f"{checkpoint} was trained from {recorded['initial_weights']}; set "
            "checkpoint.initial_weights to it"
        )
    current = base_record(initial_weights)
    if recorded.get("fingerprint") is None or current["fingerprint"] is None:
        logger.warning(
            "the LoRA base cannot be verified (no manifest): resuming on %s as recorded %s",
            current["initial_weights"],
            recorded["initial_weights"],
        )
        return
    if current["fingerprint"] != recorded["fingerprint"]:
        raise ValueError(
            f"checkpoint.initial_weights={initial_weights} ({current['initial_weights']}) is "
            f"not the base the checkpoint {checkpoint} was trained from "
            f"({recorded['initial_weights']}, fingerprint {recorded['fingerprint'][:12]}, "
            f"found {current['fingerprint'][:12]}); set checkpoint.initial_weights to the "
            "recorded folder"
        )


def load_trained_weights(model_chunk, checkpoint: Path, *, model_config=None) -> None:
    """What a LoRA run trained (adapters, fully trained parts), from its checkpoint
    written at any layout, into this rank's part of ``model_chunk`` (an adapted model)."""
    model = unwrap(model_chunk)
    keys = trained_keys(model)
    wanted = {k: v for k, v in model.sharded_state_dict().items() if k in keys}
    loaded = load_sharded({"model": wanted}, checkpoint, model_config=model_config)["model"]
    load_module_state(model, loaded, checkpoint, only=keys)


def load_adapted_model(
    model_chunk, checkpoint: Path, *, base: Optional[str] = None, model_config=None
) -> Path:
    """A LoRA checkpoint's whole model: its base (``base``, else the recorded
    ``initial_weights``; its fingerprint checked) then what the run trained. Returns the
    base folder read. Collective."""
    checkpoint = resolve_checkpoint(Path(checkpoint))
    verify_before_loading(checkpoint)
    recorded = read_base_record(checkpoint)
    if recorded is None:
        raise ValueError(f"{checkpoint} has no {ADAPTER_BASE_FILE}: not a LoRA checkpoint")
    base = base or recorded["initial_weights"]
    check_same_base(checkpoint, base)
    folder = load_model_weights(model_chunk, Path(base), model_config=model_config, base_only=True)
    load_trained_weights(model_chunk, checkpoint, model_config=model_config)
    return folder
