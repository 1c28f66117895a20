"""Save and resume training with Megatron-Core ``dist_checkpointing`` (torch_dist).

Model and optimizer go through ``dist_checkpointing`` as sharded tensors, so a
checkpoint written at one TP/PP/EP/DP layout loads at another. Everything else is
written by us as JSON (trainer state), YAML (config) or tensors-only ``torch.save``
files (per-rank RNG, loaded with ``weights_only=True``). See ``layout.py`` for the
folder structure and how a save becomes visible atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from mm1_megatron.checkpoint import layout
from mm1_megatron.checkpoint.rng import load_rng_state, save_rng_state
from mm1_megatron.compat import optimizer as optimizer_compat
from mm1_megatron.compat.checkpointing import save_sharded
from mm1_megatron.config import MM1Config, save_config
from mm1_megatron.config.schema import CheckpointConfig
from mm1_megatron.parallel.collectives import barrier, broadcast_int

logger = logging.getLogger(__name__)

MODEL_OPTIM_DIR = "model_optim"
TRAINER_STATE_FILE = "trainer_state.json"


def unwrap(chunk):
    """The MM1Model inside DDP / Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


@dataclass
class TrainingState:
    """What a checkpoint captures, by reference to the live training objects."""

    model_chunks: List[Any]
    optimizer: Any
    scheduler: Any
    data: Any
    step: int
    consumed_sequences: int
    config: MM1Config
    last_evaluation: Optional[Dict[str, Any]] = None  # eval.interval's latest results


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.save_dir = Path(cfg.save_dir) if cfg.save_dir else None
        self.async_queue = AsyncCallsQueue() if cfg.async_save else None
        if self.save_dir is not None and _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            layout.remove_stale_temporaries(self.save_dir)
        barrier()

    # ---- sharded state ----------------------------------------------------------------
    def _sharded_state_dict(self, state: TrainingState, *, is_loading: bool) -> Dict[str, Any]:
        (chunk,) = state.model_chunks
        model_state = unwrap(chunk).sharded_state_dict()
        metadata = {"distrib_optim_sharding_type": self.cfg.optimizer_sharding}
        return {
            "model": model_state,
            "optimizer": state.optimizer.sharded_state_dict(
                model_state, is_loading=is_loading, metadata=metadata
            ),
        }

    # ---- save -------------------------------------------------------------------------
    def save(self, state: TrainingState, *, blocking: bool = False) -> None:
        """Write a checkpoint of ``state`` (collective: every rank must call it)."""
        if self.save_dir is None:
            return
        self.finalize_pending(blocking=True)  # one save in flight at a time
        tmp = layout.temporary_path(self.save_dir, state.step)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / MODEL_OPTIM_DIR).mkdir(parents=True)
            self._write_trainer_files(state, tmp)
        barrier()
        save_rng_state(tmp / "rng" / f"rank_{_rank():05d}.pt")
        request = save_sharded(
            self._sharded_state_dict(state, is_loading=False),
            str(tmp / MODEL_OPTIM_DIR),
            async_save=self.async_queue is not None and not blocking,
        )
        finalize = self._finalizer(state.step)
        if request is None:
            barrier()
            finalize()
        else:
            request.add_finalize_fn(finalize)
            self.async_queue.schedule_async_request(request)
            logger.info("checkpoint of step %d is being written in the background", state.step)

    def _write_trainer_files(self, state: TrainingState, folder: Path) -> None:
        trainer_state = {
            "step": state.step,
            "consumed_sequences": state.consumed_sequences,
            "scheduler": state.scheduler.state_dict(),
            "data": state.data.state_dict(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "data_parallel_size": parallel_state.get_data_parallel_world_size(),
            "last_evaluation": state.last_evaluation,
        }
        (folder / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        save_config(state.config, folder / "config.yaml")

    def _finalizer(self, step: int) -> Callable[[], None]:
        def finalize() -> None:
            if _rank() == 0:
                tmp = layout.temporary_path(self.save_dir, step)
                layout.write_manifest(tmp)
                final = layout.publish(self.save_dir, step)
                removed = layout.apply_retention(
                    self.save_dir, keep_last=self.cfg.keep_last, keep_every=self.cfg.keep_every
                )
                logger.info(
                    "saved checkpoint %s%s",
                    final,
                    f" (removed {len(removed)} old)" if removed else "",
                )
            barrier()

        return finalize

    def finalize_pending(self, *, blocking: bool) -> None:
        """Publish background saves that have finished (all of them if ``blocking``)."""
        if self.async_queue is not None:
            self.async_queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self.async_queue is not None:
            self.finalize_pending(blocking=True)
            self.async_queue.close()

    # ---- load -------------------------------------------------------------------------
    def resolve_resume_path(self) -> Optional[Path]:
        """The checkpoint to resume from, agreed by all ranks; None to start fresh.

        ``checkpoint.load_dir`` naming one checkpoint folder must be intact (else
        ``ValueError``). Naming a save folder (or auto-resuming from ``save_dir``) takes the
        newest intact checkpoint, warning about each damaged one it skips.
        """
        chosen_step = -1
        if _rank() == 0:
            chosen = self._choose_checkpoint()
            chosen_step = layout.step_of(chosen) if chosen is not None else -1
            self._chosen = chosen
        chosen_step = broadcast_int(chosen_step)
        if chosen_step < 0:
            return None
        base = Path(self.cfg.load_dir) if self.cfg.load_dir else self.save_dir
        if layout.step_of(base) is not None:
            return base
        return base / layout.checkpoint_name(chosen_step)

    def _choose_checkpoint(self) -> Optional[Path]:
        if self.cfg.load_dir:
            target = Path(self.cfg.load_dir)
            if layout.step_of(target) is not None:
                try:
                    layout.verify_manifest(target)
                except layout.CorruptCheckpointError as exc:
                    raise ValueError(
                        f"checkpoint.load_dir={target} cannot be loaded: {exc}"
                    ) from None
                return target
            if not target.is_dir():
                raise ValueError(f"checkpoint.load_dir={target} does not exist")
            return self._newest_intact(target, required=True)
        if self.cfg.auto_resume and self.save_dir is not None:
            return self._newest_intact(self.save_dir, required=False)
        return None

    @staticmethod
    def _newest_intact(folder: Path, *, required: bool) -> Optional[Path]:
        candidates = layout.candidates_for_resume(folder)
        for candidate in candidates:
            try:
                layout.verify_manifest(candidate)
                return candidate
            except layout.CorruptCheckpointError as exc:
                logger.warning(
                    "skipping damaged checkpoint %s: %s; trying the previous one",
                    candidate.name,
                    exc,
                )
        if required:
            raise ValueError(
                f"no intact checkpoint in {folder} "
                f"({len(candidates)} found, all damaged or incomplete)"
            )
        return None

    def load(self, state: TrainingState, path: Path) -> Dict[str, Any]:
        """Restore model, optimizer, scheduler, RNG and returns the trainer state dict."""
        optimizer_compat.prepare_for_load(state.optimizer)
        loaded = dist_checkpointing.load(
            self._sharded_state_dict(state, is_loading=True), str(path / MODEL_OPTIM_DIR)
        )
        (chunk,) = state.model_chunks
        unwrap(chunk).load_state_dict(loaded["model"])
        state.optimizer.load_state_dict(loaded["optimizer"])
        optimizer_compat.after_load(state.optimizer)
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text())
        state.scheduler.load_state_dict(trainer_state["scheduler"])
        rng_file = path / "rng" / f"rank_{_rank():05d}.pt"
        same_world = trainer_state["world_size"] == (
            dist.get_world_size() if dist.is_initialized() else 1
        )
        if same_world and rng_file.is_file():
            load_rng_state(rng_file)
        else:
            logger.warning(
                "checkpoint was written by %d ranks: RNG states not restored "
                "(weights, optimizer, schedule and data position are)",
                trainer_state["world_size"],
            )
        logger.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state

    def load_pretrained_part(self, model_chunk, prefix: str, path: Path) -> None:
        """Load only the parameters under ``prefix`` (e.g. ``vision_encoder.``) from another
        checkpoint; the rest of the model keeps its fresh initialisation."""
        load_model_weights(model_chunk, path, prefix=prefix)


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


def load_model_weights(model_chunk, path: Path, *, prefix: str = "") -> Path:
    """Load the model tensors under ``prefix`` (all by default) from a checkpoint written at
    any TP/PP/EP layout into this rank's part of ``model_chunk``; no optimizer state.
    Returns the checkpoint folder read."""
    path = resolve_checkpoint(path)
    model = unwrap(model_chunk)
    wanted = {
        key: value for key, value in model.sharded_state_dict().items() if key.startswith(prefix)
    }
    folder = path / MODEL_OPTIM_DIR if (path / MODEL_OPTIM_DIR).is_dir() else path
    loaded = dist_checkpointing.load({"model": wanted}, str(folder))["model"]
    result = model.load_state_dict(loaded, strict=False)
    missing = [key for key in result.missing_keys if key.startswith(prefix)]
    if missing:
        what = prefix.rstrip(".") or "the model"
        raise ValueError(f"{path} lacks {len(missing)} tensors of {what}, e.g. {missing[0]}")
    logger.info(
        "loaded %d tensors of %s from %s", len(loaded), prefix.rstrip(".") or "the model", path
    )
    return path
