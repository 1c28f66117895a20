"""The training loop: Megatron-Core schedules, DDP, (distributed) AdamW, cosine schedule.

``Trainer`` owns the pieces and their order; each step is
``_next_microbatches -> forward_backward -> optimizer.step -> scheduler.step -> log``.
Loss is averaged per text token across micro-batches and data-parallel ranks
(``calculate_per_token_loss``), so gradient accumulation and DP give the same update as
one large batch.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm1_megatron.batch import model_inputs
from mm1_megatron.checkpoint import CheckpointManager, TrainingState
from mm1_megatron.checkpoint.adapters import check_same_base, records_its_base
from mm1_megatron.config import MM1Config, save_config, validate_config, validate_environment
from mm1_megatron.config.layout import num_microbatches
from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.pipeline.loader import Balancing
from mm1_megatron.data.pipeline.tiling import tile_size
from mm1_megatron.models import build_mm1_model
from mm1_megatron.models.param_count import count_parameters
from mm1_megatron.parallel import init_distributed, seed_everything
from mm1_megatron.parallel.collectives import (
    all_gather_objects,
    all_gather_tensor,
    all_reduce_values,
    barrier,
)
from mm1_megatron.parallel.wrapping import resolve_overlap, wrap_for_training
from mm1_megatron.training.flops import balance_weights, dense_bf16_peak_flops
from mm1_megatron.training.health import LossMonitor
from mm1_megatron.training.lr import resolve_peak_lr
from mm1_megatron.training.metrics import MetricsLogger, StepAccounting, log_run_start
from mm1_megatron.training.optimizer import build_optimizer, build_scheduler
from mm1_megatron.training.periodic_eval import PeriodicEvaluation
from mm1_megatron.training.preemption import (
    Preempted,
    PreemptionHandler,
    StoppedWithoutCheckpoint,
    write_preemption_marker,
)
from mm1_megatron.training.preference import preference_loss_and_report
from mm1_megatron.training.profiling import StepProfiler
from mm1_megatron.training.reference import ReferenceModel
from mm1_megatron.training.runtime import (
    resolve_build_choices,
    resolve_machine_settings,
    transformer_engine_version,
)
from mm1_megatron.training.step import document_split, forward_step, loss_and_report
from mm1_megatron.training.stragglers import SlowRankDetector
from mm1_megatron.training.trackers import evaluation_rows, open_trackers
from mm1_megatron.utils.logging_setup import log_info_on_this_rank

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: MM1Config):
        validate_config(cfg)
        self.ctx = init_distributed(
            cfg.parallel, timeout_minutes=cfg.parallel.collective_timeout_minutes
        )
        cuda = self.ctx.device.type == "cuda"
        capability = torch.cuda.get_device_capability() if cuda else None
        cfg = self.cfg = self._resolve_machine_settings(cfg, cuda=cuda, capability=capability)
        validate_environment(cfg, cuda_available=cuda, cuda_capability=capability)
        self.stragglers = SlowRankDetector(cfg.logging.stragglers, self.ctx.rank)
        self.bf16 = self.ctx.device.type == "cuda" and cfg.training.precision in ("auto", "bf16")
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.num_microbatches = self._num_microbatches()
        seed_everything(cfg.training.seed)
        self.output_dir = Path(cfg.logging.output_dir)
        if self.ctx.is_main:
            save_config(cfg, self.output_dir / "config.yaml")
        self.data, self.tokenizer = self._build_data()  # the tokenizer sizes the model
        # How each micro-batch is laid out for TE's THD context parallelism (None: as is).
        self.documents = document_split(cfg, self.tokenizer)
        if cfg.model.llm.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model.llm.vocab_size={cfg.model.llm.vocab_size} is smaller than "
                f"the tokenizer's {self.tokenizer.vocab_size} tokens"
            )
        self.checkpoints = CheckpointManager(cfg.checkpoint)
        resume_path = self.checkpoints.resolve_resume_path()
        self.model_chunks = [self._build_model(resuming=resume_path is not None)]
        self._load_pretrained_parts(resume_path)
        # DPO's reference: the starting weights (training/reference.py).
        self.reference = None
        if cfg.training.objective == "preference":
            initial = cfg.checkpoint.initial_weights
            self.reference = ReferenceModel(
                self.model_chunks,
                lora=cfg.model.lora.enabled,
                # Drawn on the device when initial_weights replaces the draw anyway.
                build=lambda: self._stage_model(resuming=initial is not None),
                bf16=self.bf16,
                initial_weights=Path(initial) if initial else None,
            )
        self.peak_flops = self._peak_flops_per_device()
        self.accounting = StepAccounting(
            cfg,
            device=self.ctx.device,
            world_size=self.ctx.world_size,
            num_microbatches=self.num_microbatches,
            peak_flops=self.peak_flops,
        )
        self.param_counts = count_parameters(cfg.model)
        self.peak_lr = resolve_peak_lr(cfg.optimizer, self.param_counts.llm_active_non_embedding)
        self.optimizer = build_optimizer(
            cfg.optimizer,
            self.model_chunks,
            peak_lr=self.peak_lr,
            bf16=self.bf16,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        self.scheduler = build_scheduler(
            cfg.optimizer,
            self.optimizer,
            peak_lr=self.peak_lr,
            train_steps=cfg.training.train_steps,
        )
        self._wire_model_config()
        # Replaceable (tests inject non-finite losses).
        self.loss_func = loss_and_report
        if cfg.training.objective == "preference":
            self.loss_func = partial(preference_loss_and_report, settings=cfg.preference)
        self.step = 0
        self.consumed_sequences = 0
        self.loss_monitor = LossMonitor(
            max_nonfinite_steps=cfg.training.max_nonfinite_steps,
            spike_ratio=cfg.training.loss_spike_ratio,
        )
        self.periodic_eval = self._periodic_evaluation()
        self._resume(resume_path)
        self.is_logging_rank = (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        if self.is_logging_rank:
            log_info_on_this_rank()

    # ---- construction -------------------------------------------------------------------
    def _resolve_machine_settings(self, cfg: MM1Config, *, cuda: bool, capability) -> MM1Config:
        """``model.transformer_impl=auto`` and ``model.fp8_on_gpu`` decided once, here; the
        saved config.yaml and every checkpoint's hold the result."""
        needs_te = cfg.model.transformer_impl == "auto" and cuda
        cfg, lines = resolve_machine_settings(
            cfg,
            cuda=cuda,
            cuda_capability=capability,
            te_version=transformer_engine_version() if needs_te else None,
        )
        if self.ctx.is_main:
            for line in lines:
                logger.info("%s", line)
        # Every rank decides on its own machine; one node whose TE does not import would
        # build other layers than the rest (different modules, keys, a hang).
        decided = (cfg.model.transformer_impl, cfg.model.fp8)
        differing = sorted({str(d) for d in all_gather_objects(decided)})
        if len(differing) > 1:
            raise ValueError(
                "the ranks resolved model.transformer_impl/model.fp8 differently "
                f"({', '.join(differing)}): Transformer Engine imports on some nodes and not "
                "on others; install the same environment everywhere or set both explicitly"
            )
        return validate_config(cfg)  # e.g. moe.grouped_gemm=true with auto -> local

    def _num_microbatches(self) -> int:
        t = self.cfg.training
        return num_microbatches(t.global_batch_size, t.micro_batch_size, self.dp_size)

    def _stage_model(self, *, resuming: bool):
        """This pipeline stage's model, unwrapped."""
        cfg = self.cfg
        choices = resolve_build_choices(
            cfg, cuda=self.ctx.device.type == "cuda", bf16=self.bf16, resuming=resuming
        )
        return build_mm1_model(
            cfg.model,
            cfg.parallel,
            image_token_id=self.tokenizer.image_token_id,
            runtime=choices.runtime,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            init_seed=choices.init_seed,
            adapter_seed=cfg.training.seed,
        )

    def _build_model(self, *, resuming: bool):
        cfg = self.cfg
        model = self._stage_model(resuming=resuming)
        overlap_grad, self.overlap_param_gather = resolve_overlap(
            cfg.parallel, cuda=self.ctx.device.type == "cuda"
        )
        return wrap_for_training(
            model,
            device=self.ctx.device,
            freeze=cfg.model.freeze,
            bf16=self.bf16,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            overlap_grad_reduce=overlap_grad,
            overlap_param_gather=self.overlap_param_gather,
        )

    def _peak_flops_per_device(self) -> Optional[float]:
        """``logging.peak_flops_per_device``, else the GPU's dense BF16 peak (for MFU)."""
        if self.cfg.logging.peak_flops_per_device is not None:
            return self.cfg.logging.peak_flops_per_device
        if self.ctx.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.ctx.device)
        peak = dense_bf16_peak_flops(name)
        if peak is None:
            logger.warning(
                "no known BF16 peak for %s: MFU is not reported; set logging.peak_flops_per_device",
                name,
            )
        return peak

    def _load_pretrained_parts(self, resume_path: Optional[Path]) -> None:
        initial = self.cfg.checkpoint.initial_weights
        lora = self.cfg.model.lora.enabled
        if resume_path is not None and records_its_base(self.cfg):
            check_same_base(resume_path, initial)  # LoRA's base, or DPO's reference
        if initial is not None and (resume_path is None or lora):
            for chunk in self.model_chunks:
                self.checkpoints.load_pretrained_part(
                    chunk, "", Path(initial), model_config=self.cfg.model, base_only=lora
                )
        parts = {
            "vision_encoder.": self.cfg.checkpoint.pretrained_vision_encoder,
            "language_model.": self.cfg.checkpoint.pretrained_language_model,
        }
        for prefix, path in parts.items():
            if path is not None:
                self.checkpoints.load_pretrained_part(
                    self.model_chunks[0],
                    prefix,
                    Path(path),
                    model_config=self.cfg.model,
                    base_only=lora,
                )

    def _training_state(self) -> TrainingState:
        return TrainingState(
            self.model_chunks,
            self.optimizer,
            self.scheduler,
            self.data,
            self.step,
            self.consumed_sequences,
            self.cfg,
            self.periodic_eval.last if self.periodic_eval is not None else None,
        )

    def _periodic_evaluation(self) -> Optional[PeriodicEvaluation]:
        if self.cfg.eval.interval == 0:
            return None
        return PeriodicEvaluation(
            self.cfg,
            self.tokenizer,
            self.model_chunks,
            self._forward_step,
            self.accounting.losses,
            self.ctx.device,
            overlap_param_gather=self.overlap_param_gather,
        )

    def _resume(self, path: Optional[Path]) -> None:
        if path is None:
            return
        trainer_state = self.checkpoints.load(self._training_state(), path)
        self.step = trainer_state["step"]
        self.consumed_sequences = trainer_state["consumed_sequences"]
        # The loader state is global (the same on every rank); a changed DP size
        # continues at the first sequence no rank has consumed.
        self.data.load_state_dict(trainer_state["data"])
        if self.periodic_eval is not None:
            self.periodic_eval.last = trainer_state.get("last_evaluation") or {}

    def save_checkpoint(self, *, blocking: bool = False) -> None:
        if self.overlap_param_gather:
            # The last step's all-gather waits for the next forward; gather now, so every
            # rank (and the data-parallel replica that writes) saves the updated weights.
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)
        self.checkpoints.save(self._training_state(), blocking=blocking)

    def _wire_model_config(self) -> None:
        """What the Megatron-Core schedule reads from the model's config."""
        config = self.model_chunks[0].config
        config.finalize_model_grads_func = self.stragglers.timed_gradient_sync(finalize_model_grads)
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = self.model_chunks[0].no_sync

    def _build_data(self):
        """The micro-batch loader and tokenizer from ``data.*`` (this DP rank's share)."""
        return build_run_data(
            self.cfg,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=self.dp_size,
            balancing=self._balancing(),
        )

    def _balancing(self) -> Optional[Balancing]:
        """``data.balance``: costs weighed in training FLOPs, exchanged over the
        data-parallel group (its gloo twin when there is one: no device sync)."""
        settings = self.cfg.data.balance
        if not settings.enabled:
            return None
        try:
            group = parallel_state.get_data_parallel_group_gloo()
        except (AssertionError, RuntimeError):
            group = None
        if group is None:
            group = parallel_state.get_data_parallel_group()

        def exchange(rows: np.ndarray) -> np.ndarray:
            return all_gather_tensor(torch.from_numpy(rows), group=group).numpy()

        return Balancing(
            num_microbatches=self.num_microbatches,
            weights=balance_weights(self.cfg.model, tile_size(self.cfg.data.tiling)),
            exchange=exchange,
            order=settings.micro_batch_order,
        )

    # ---- one step -----------------------------------------------------------------------
    def _checked(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Reject image placeholders without images here, on the host copy: the model's own
        check would cost a device sync per micro-batch on GPU."""
        if batch["images"].shape[0] == 0 and bool(
            (batch["tokens"] == self.tokenizer.image_token_id).any()
        ):
            raise ValueError("a batch has image placeholders but no images")
        return batch

    def _forward_step(self, data_iterator, model):
        return forward_step(data_iterator, model, loss_func=self.loss_func)

    def train_step(self) -> Dict[str, float]:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        # Counts are read from the host copies, so reading them costs no device sync.
        host_batches, data_wait_s = [], 0.0
        for _ in range(self.num_microbatches):
            waited_from = time.perf_counter()
            batch = next(self.data)
            data_wait_s += time.perf_counter() - waited_from
            host_batches.append(self._checked(batch))
        self.stragglers.add("data_wait", data_wait_s)
        if self.reference is not None:
            self.reference.score(
                host_batches,
                device=self.ctx.device,
                seq_length=self.cfg.training.seq_length,
                micro_batch_size=self.cfg.training.micro_batch_size,
            )
        # Each micro-batch reaches the device when the schedule takes it (not all of a
        # step's up front), and its images only on the stage that encodes them.
        with_images = parallel_state.is_pipeline_first_stage()
        batches = (
            model_inputs(b, self.ctx.device, images=with_images, documents=self.documents)
            for b in host_batches
        )
        with self.stragglers.timed("compute"):
            reports = get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=batches,
                model=self.model_chunks,
                num_microbatches=self.num_microbatches,
                seq_length=self.cfg.training.seq_length,
                micro_batch_size=self.cfg.training.micro_batch_size,
                forward_only=False,
            )
        metrics = self.accounting.losses(reports)
        self.step += 1
        self.consumed_sequences += self.cfg.training.global_batch_size
        grad_norm = float("nan")
        if self._loss_is_finite(metrics):
            with self.stragglers.timed("optimizer"):
                update_successful, grad_norm, _ = self.optimizer.step()
            if update_successful:
                self.scheduler.step(increment=1)
        else:
            metrics["skipped_nonfinite"] = 1.0
            self.loss_monitor.record_nonfinite(self.step)
        metrics.update(self.accounting.moe_losses())
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics.update(
            self.accounting.batch_figures(self.data, host_batches, data_wait_s=data_wait_s)
        )
        return metrics

    def _loss_is_finite(self, metrics: Dict[str, float]) -> bool:
        """Agreed by every rank: only the last pipeline stage sees the loss."""
        bad = 0.0
        if parallel_state.is_pipeline_last_stage():
            bad = 0.0 if math.isfinite(metrics["loss"]) else 1.0
        (flag,) = all_reduce_values([bad], op="max")
        return flag == 0.0

    # ---- the loop -----------------------------------------------------------------------
    def _checkpoint_and_stop(self) -> None:
        """After a stop signal: save, leave the requeue marker, raise ``Preempted``; or,
        with nowhere to save, raise ``StoppedWithoutCheckpoint`` (never a requeue)."""
        save_dir = self.cfg.checkpoint.save_dir
        if not save_dir:
            raise StoppedWithoutCheckpoint(
                f"stopped by a signal after step {self.step} without checkpoint.save_dir: "
                "no checkpoint was written, so a relaunch would start again from step 0; set "
                "checkpoint.save_dir to make preemption resumable"
            )
        self.save_checkpoint(blocking=True)
        if self.ctx.is_main:
            write_preemption_marker(self.step, save_dir)
        # No rank exits before the marker exists: a launcher that kills the job on the
        # first exit would otherwise race rank 0's write.
        barrier()
        raise Preempted(f"stopped by a signal after step {self.step}")

    def train(self) -> List[Dict[str, float]]:
        """Run until ``training.train_steps``; returns the per-step metrics (logging rank).

        Raises ``Preempted`` after writing a checkpoint when a stop signal arrives, and
        ``TrainingDiverged`` after too many non-finite losses.
        """
        cfg = self.cfg
        history: List[Dict[str, float]] = []
        log_run_start(
            cfg,
            self.param_counts,
            peak_lr=self.peak_lr,
            num_microbatches=self.num_microbatches,
            dp_size=self.dp_size,
            step=self.step,
        )
        preemption = PreemptionHandler()
        profiler = StepProfiler(cfg.logging.profile, self.output_dir, self.ctx.rank)
        interval = cfg.checkpoint.save_interval
        try:
            with MetricsLogger(
                self.output_dir,
                enabled=self.is_logging_rank,
                total_steps=cfg.training.train_steps,
                log_interval=cfg.logging.log_interval,
                tensorboard=cfg.logging.tensorboard,
                progress_bar=cfg.logging.progress_bar,
                append=self.step > 0,
                trackers=open_trackers(cfg, self.output_dir, resumed=self.step > 0)
                if self.is_logging_rank
                else (),
            ) as metrics_logger:
                while self.step < cfg.training.train_steps:
                    self.accounting.start_step()
                    with profiler.step(self.step + 1):
                        metrics = self.train_step()
                    metrics.update(self.accounting.throughput(metrics))
                    metrics.update(self.stragglers.end_step(self.step, report=self.is_logging_rank))
                    if self.periodic_eval is not None and self.periodic_eval.due(self.step):
                        scores = self.periodic_eval.run(self.step)
                        metrics.update(scores)
                        metrics_logger.log_evaluation(self.step, evaluation_rows(self.step, scores))
                    if self.is_logging_rank and self.loss_monitor.is_spike(
                        self.step, metrics["loss"]
                    ):
                        metrics["loss_spike"] = 1.0
                    metrics_logger.log(self.step, metrics)
                    history.append(metrics)
                    self.checkpoints.finalize_pending(blocking=False)
                    if preemption.stop_requested():
                        self._checkpoint_and_stop()
                    if interval and self.step % interval == 0:
                        self.save_checkpoint()
            if self.cfg.checkpoint.save_dir and not (interval and self.step % interval == 0):
                self.save_checkpoint(blocking=True)
        finally:
            profiler.close()
            preemption.restore()
            self.checkpoints.close()
            self.data.close()  # stops prefetching workers
        return history
