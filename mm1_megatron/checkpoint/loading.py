"""Reading checkpoints: the trainer state, the sharded tensors with readable errors, the
manifest check every reader runs first, and model weights alone (``initial_weights``,
``pretrained_*``, ``mm1 eval``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Collection, Dict, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing

from mm1_megatron.checkpoint import layout
from mm1_megatron.checkpoint.diagnostics import READ_FAILURES, load_error
from mm1_megatron.checkpoint.key_layout import is_extra_state, reconcile_with_checkpoint
from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR, TRAINER_STATE_FILE
from mm1_megatron.checkpoint.manifest import CorruptCheckpointError, verify_manifest
from mm1_megatron.compat.te_extra_state import check_extra_state
from mm1_megatron.models.lora import is_adapter_key
from mm1_megatron.parallel.collectives import all_gather_objects

logger = logging.getLogger(__name__)

ADAPTER_BASE_FILE = "adapter_base.json"  # in a LoRA run's checkpoints (``adapters.py``)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def unwrap(chunk):
    """The MM1Model inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def first_problem(candidate: Path) -> Optional[str]:
    """What is wrong with ``candidate`` (checked by all ranks, each reading a share of
    its files), or None when it is intact. Collective."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        verify_manifest(candidate, share=(_rank(), world))
        problem = None
    except CorruptCheckpointError as exc:
        problem = str(exc)
    return next((p for p in all_gather_objects(problem) if p is not None), None)


_TRAINER_STATE_KEYS = ("step", "consumed_sequences", "scheduler", "data", "world_size")


def read_trainer_state(path: Path) -> Dict[str, Any]:
    """``trainer_state.json`` of a checkpoint; ``ValueError`` naming it when unreadable."""
    file = Path(path) / TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {file}: {exc}") from None
    missing = [
        key for key in _TRAINER_STATE_KEYS if not isinstance(state, dict) or key not in state
    ]
    if missing:
        raise ValueError(f"{file} lacks {', '.join(missing)}: not a checkpoint of mm1 train")
    return state


_SECTIONS = {"vision_encoder.": "vision", "connector.": "connector", "language_model.": "llm"}


def load_sharded(sharded_state_dict, path: Path, *, model_config=None, prefix: str = ""):
    """``dist_checkpointing.load`` of checkpoint ``path``, written with either layer
    implementation (``key_layout``); a damaged or foreign checkpoint raises ``ValueError``
    naming it (and, for another model's, the config fields that differ) instead of the
    reader's own exception."""
    folder = path / MODEL_OPTIM_DIR if (path / MODEL_OPTIM_DIR).is_dir() else path
    try:
        reconcile_with_checkpoint(sharded_state_dict, folder).log(path)
        return dist_checkpointing.load(sharded_state_dict, str(folder))
    except READ_FAILURES as exc:
        raise load_error(exc, path, model_config, _SECTIONS.get(prefix, "")) from exc


def load_module_state(
    module,
    state: Dict[str, Any],
    path: Path,
    *,
    prefix: str = "",
    only: Optional[Collection[str]] = None,
) -> None:
    """``module.load_state_dict(state)``, strict (about the keys under ``prefix``, or the
    keys ``only`` names) except for Transformer Engine extra state:
    ``core_attention._extra_state`` is never in a checkpoint (megatron-core does not save
    it) and a local-layer checkpoint holds none (``key_layout``). Every extra state is
    checked before TE unpickles it (``check_extra_state``). Collective: a problem on any
    rank (one pipeline stage, one expert shard) raises ``ValueError`` on every rank."""
    try:
        for key, value in state.items():
            if is_extra_state(key):
                check_extra_state(value, source=f"{path}: {key}")
        result = module.load_state_dict(state, strict=False)
        problem = _state_problem(result, path, prefix, only)
    except ValueError as exc:  # CheckpointFileError included: nothing was unpickled
        problem = str(exc)
    problems = [p for p in all_gather_objects(problem) if p is not None]
    if problems:
        raise ValueError(problems[0])


def _state_problem(
    result, path: Path, prefix: str, only: Optional[Collection[str]]
) -> Optional[str]:
    missing = [
        key
        for key in result.missing_keys
        if key.startswith(prefix) and not is_extra_state(key) and (only is None or key in only)
    ]
    unexpected = [key for key in result.unexpected_keys if not is_extra_state(key)]
    if missing:
        what = prefix.rstrip(".") or "the model"
        return f"{path} lacks {len(missing)} tensors of {what}, e.g. {missing[0]}"
    if unexpected:
        return (
            f"{path} holds {len(unexpected)} tensors this model does not have, e.g. {unexpected[0]}"
        )
    return None


def verify_before_loading(path: Path) -> None:
    """Check ``path``'s files against its manifest, each rank a share (collective); a
    folder without a manifest (written by hand or by an old converter) is loaded with a
    warning."""
    if not (Path(path) / layout.MANIFEST_FILE).is_file():
        if _rank() == 0:
            logger.warning("%s has no %s: its files cannot be checked", path, layout.MANIFEST_FILE)
        return
    problem = first_problem(Path(path))
    if problem is not None:
        raise ValueError(f"checkpoint {path} cannot be loaded: {problem}")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a save folder's newest complete checkpoint."""
    path = Path(path)
    latest = layout.read_latest(path)
    if latest is not None:
        return latest
    if not (path / MODEL_OPTIM_DIR).is_dir() and not (path / "metadata.json").is_file():
        raise ValueError(
            f"{path} is neither a checkpoint (no {MODEL_OPTIM_DIR}/) nor a save folder with "
            f"a 'latest' checkpoint"
        )
    return path


def load_model_weights(
    model_chunk, path: Path, *, prefix: str = "", model_config=None, base_only: bool = False
) -> Path:
    """Load the model tensors under ``prefix`` (all by default) from a checkpoint written at
    any TP/PP/EP layout into this rank's part of ``model_chunk``; no optimizer state.
    ``base_only``: not the LoRA adapters (a LoRA run's base). The checkpoint's files are
    checked against its manifest first (collective). Returns the checkpoint folder read."""
    path = resolve_checkpoint(path)
    verify_before_loading(path)
    if base_only and (path / ADAPTER_BASE_FILE).is_file():
        raise ValueError(
            f"{path} is a LoRA checkpoint (adapters only), not a base model: merge it first "
            "(mm1 convert export) or start from its base"
        )
    model = unwrap(model_chunk)
    wanted = {
        key: value
        for key, value in model.sharded_state_dict().items()
        if key.startswith(prefix) and not (base_only and is_adapter_key(key))
    }
    loaded = load_sharded({"model": wanted}, path, model_config=model_config, prefix=prefix)
    loaded = loaded["model"]
    # Strict about every base tensor under prefix; the adapters are not in a base.
    only = {k for k in model.state_dict() if not is_adapter_key(k)} if base_only else None
    load_module_state(model, loaded, path, prefix=prefix, only=only)
    logger.info(
        "loaded %d tensors of %s from %s", len(loaded), prefix.rstrip(".") or "the model", path
    )
    return path
