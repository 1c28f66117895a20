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
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

from mm1_megatron.checkpoint import adapters, layout
from mm1_megatron.checkpoint.diagnostics import model_differences
from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR, TRAINER_STATE_FILE
from mm1_megatron.checkpoint.loading import (  # noqa: F401 (re-exported)
    first_problem,
    load_model_weights,
    load_module_state,
    load_sharded,
    read_trainer_state,
    resolve_checkpoint,
    unwrap,
    verify_before_loading,
)
from mm1_megatron.checkpoint.manifest import write_rank_digests
from mm1_megatron.checkpoint.rng import load_rng_state, save_rng_state
from mm1_megatron.checkpoint.schedule import (
    check_schedule,
    planned_group_lrs,
    restore_schedule,
)
from mm1_megatron.compat import optimizer as optimizer_compat
from mm1_megatron.compat.checkpointing import save_sharded
from mm1_megatron.compat.param_groups import align_saved_param_groups
from mm1_megatron.config import MM1Config, save_config
from mm1_megatron.config.schema import CheckpointConfig
from mm1_megatron.parallel.collectives import all_gather_objects, barrier

logger = logging.getLogger(__name__)


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


def _write_then_hash(write, folder: str, rank: int, *args, **kwargs):
    result = write(*args, **kwargs)
    write_rank_digests(Path(folder), rank)
    return result


def hash_after_writing(request, folder: Path, rank: int):
    """The asynchronous save ``request`` whose background writer also hashes this rank's
    files once they are written, so the digests cost the training loop nothing."""
    if request.async_fn is None:  # nothing to write on this rank; rank 0 hashes the rest
        return request
    return request._replace(async_fn=partial(_write_then_hash, request.async_fn, str(folder), rank))


class CheckpointManager:
    def __init__(self, cfg: CheckpointConfig):
        self.cfg = cfg
        self.save_dir = Path(cfg.save_dir) if cfg.save_dir else None
        self.async_queue = AsyncCallsQueue() if cfg.async_save else None
        self._base_record: Optional[Dict[str, Optional[str]]] = None
        if self.save_dir is not None and _rank() == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            layout.remove_stale_temporaries(self.save_dir)
        barrier()

    # ---- sharded state ----------------------------------------------------------------
    def _sharded_state_dict(self, state: TrainingState, *, is_loading: bool) -> Dict[str, Any]:
        (chunk,) = state.model_chunks
        model_state = unwrap(chunk).sharded_state_dict()
        if state.config.model.lora.enabled:  # the frozen base is initial_weights
            keys = adapters.trained_keys(unwrap(chunk))
            model_state = adapters.trained_state(model_state, keys)
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
            write_rank_digests(tmp, _rank())
            barrier()
            finalize()
        else:
            request = hash_after_writing(request, tmp, _rank())
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
        if adapters.records_its_base(state.config):
            adapters.write_base_record(folder, self._adapter_base_record(state.config))

    def _adapter_base_record(self, config: MM1Config) -> Dict[str, Optional[str]]:
        """The base of a LoRA run, fingerprinted once (it does not change during a run)."""
        if self._base_record is None:
            initial = config.checkpoint.initial_weights
            assert initial is not None, "validate_config requires it with save_dir"
            self._base_record = adapters.base_record(initial)
        return self._base_record

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
        """The checkpoint to resume from, the same folder on every rank; None to start fresh.

        Rank 0 lists the candidates (``checkpoint.load_dir`` naming one checkpoint folder:
        that folder only; a save folder, or auto-resuming from ``save_dir``: what
        ``latest`` names, then every ``step_N`` folder, newest first); every rank checks
        its share of each candidate's files against the manifest (sizes and SHA-256), and
        the first intact candidate is taken, with a warning naming each damaged one
        skipped. A damaged explicit checkpoint folder raises ``ValueError``.
        """
        explicit, candidates, error = False, [], None
        if _rank() == 0:
            try:
                explicit, candidates = self._resume_candidates()
            except ValueError as exc:  # raised on every rank below, not only here
                error = str(exc)
        shared = all_gather_objects((explicit, [str(c) for c in candidates], error))[0]
        explicit, candidates, error = shared
        if error is not None:
            raise ValueError(error)
        for candidate in map(Path, candidates):
            problem = first_problem(candidate)
            if problem is None:
                return candidate
            if explicit:
                raise ValueError(f"checkpoint.load_dir={candidate} cannot be loaded: {problem}")
            if _rank() == 0:
                logger.warning(
                    "skipping damaged checkpoint %s: %s; trying the previous one",
                    candidate.name,
                    problem,
                )
        if candidates and self.cfg.load_dir:
            raise ValueError(
                f"no intact checkpoint in {self.cfg.load_dir} "
                f"({len(candidates)} found, all damaged or incomplete)"
            )
        return None

    def _resume_candidates(self) -> Tuple[bool, List[Path]]:
        """(whether ``load_dir`` names one checkpoint, the folders to try in order)."""
        if self.cfg.load_dir:
            target = Path(self.cfg.load_dir)
            if layout.step_of(target) is not None:
                return True, [target]
            if not target.is_dir():
                raise ValueError(f"checkpoint.load_dir={target} does not exist")
            candidates = layout.candidates_for_resume(target)
            if not candidates:
                raise ValueError(f"checkpoint.load_dir={target} holds no step_N checkpoint")
            return False, candidates
        if self.cfg.auto_resume and self.save_dir is not None:
            return False, layout.candidates_for_resume(self.save_dir)
        return False, []

    def load(self, state: TrainingState, path: Path) -> Dict[str, Any]:
        """Restore model, optimizer, scheduler, RNG and returns the trainer state dict."""
        trainer_state = read_trainer_state(path)
        lora = state.config.model.lora.enabled  # the base is loaded: check_same_base
        schedule = dict(
            policy=state.config.optimizer.schedule_on_resume, checkpoint=path, config=state.config
        )
        if not model_differences(path, state.config.model):  # else the load's error first
            check_schedule(state.scheduler, trainer_state["scheduler"], **schedule)
        planned_groups = planned_group_lrs(state.optimizer)
        optimizer_compat.prepare_for_load(state.optimizer)
        loaded = load_sharded(
            self._sharded_state_dict(state, is_loading=True),
            path,
            model_config=state.config.model,
        )
        (chunk,) = state.model_chunks
        only = adapters.trained_keys(unwrap(chunk)) if lora else None
        load_module_state(unwrap(chunk), loaded["model"], path, only=only)
        saved_groups = align_saved_param_groups(loaded["optimizer"], state.optimizer.param_groups)
        state.optimizer.load_state_dict(loaded["optimizer"])
        optimizer_compat.after_load(state.optimizer)
        restore_schedule(
            state.scheduler,
            trainer_state["scheduler"],
            **schedule,
            planned_groups=planned_groups,
            saved_groups=saved_groups,
        )
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

    def load_pretrained_part(
        self, model_chunk, prefix: str, path: Path, *, model_config=None, base_only=False
    ) -> None:
        """Load only the parameters under ``prefix`` (e.g. ``vision_encoder.``) from another
        checkpoint; the rest of the model keeps its fresh initialisation. ``base_only``:
        not the LoRA adapters."""
        load_model_weights(
            model_chunk, path, prefix=prefix, model_config=model_config, base_only=base_only
        )
