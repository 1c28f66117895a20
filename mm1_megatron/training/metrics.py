"""A step's figures and where they go: ``StepAccounting`` computes what each step
contributes to ``metrics.jsonl`` (losses, counts, throughput), ``MetricsLogger`` writes
them (JSON lines, console progress and TensorBoard scalars, from one rank)."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state

from mm1_megatron.compat.moe import collect_moe_aux_losses, forget_moe_aux_losses
from mm1_megatron.config import MM1Config
from mm1_megatron.data import SOURCE_IDS
from mm1_megatron.data.pipeline.balance import CostWeights, SequenceCost, grid_patches
from mm1_megatron.data.pipeline.reporting import data_metrics
from mm1_megatron.data.pipeline.tiling import tile_size
from mm1_megatron.models.param_count import lora_parameters, moe_layer_flags
from mm1_megatron.parallel.collectives import all_reduce_, all_reduce_values
from mm1_megatron.training.flops import (
    balance_weights,
    causal_attention_pairs,
    model_flops_utilization,
    training_flops_per_step,
)

logger = logging.getLogger("mm1_megatron.train")


def vision_cost_rows(host_batches: Sequence[Dict[str, torch.Tensor]]) -> np.ndarray:
    """``[len(host_batches), NUM_COST_FIELDS]`` ``balance.SequenceCost`` rows, one per
    micro-batch, with its vision counts only (``attention_pairs`` 0): the encoder inputs
    (``num_images``: images, or tiles with tiling) and, at native resolution, their patches
    and patch pairs from ``image_grids``, counted as ``balance.cost_of_packed`` does."""
    rows = []
    for batch in host_batches:
        patches, patch_pairs = grid_patches(batch.get("image_grids"))
        rows.append(SequenceCost(int(batch["num_images"].sum()), patches, patch_pairs, 0).as_row())
    return np.asarray(rows, dtype=np.int64).reshape(len(rows), -1)


def vision_flops(host_batches: Sequence[Dict[str, torch.Tensor]], weights: CostWeights) -> float:
    """Training FLOPs of the image encoder and connector over the images of
    ``host_batches`` (one rank's micro-batches of a step), weighed as data balancing
    weighs them (``flops.balance_weights``)."""
    if not host_batches:
        return 0.0
    return float(weights.vision(vision_cost_rows(host_batches)).sum())


def vision_imbalance(max_rank: float, total: float, num_ranks: int) -> float:
    """``balance.imbalance`` of per-rank loads known only by their max and sum: max / mean,
    1.0 when no rank has any (and never below 1.0, which only rounding could give)."""
    mean = total / max(num_ranks, 1)
    return max(1.0, max_rank / mean) if mean > 0 else 1.0


class StepAccounting:
    """The per-step metrics of a training run, computed the same way on every rank.

    ``Trainer.train_step`` builds one step's record from these calls, in this order, and
    the loop adds the throughput figures:

    - ``losses``: ``loss`` and ``loss/<source>``, token-weighted means over the step's
      micro-batches and the data-parallel ranks (empty off the last pipeline stage, the
      only one that sees the loss); periodic evaluation reduces its held-out loss with it;
    - ``moe_losses``: ``moe/<router loss>``, averaged over MoE layers and micro-batches;
    - ``batch_figures``: the data pipeline's ``data/*`` counters and the step's
      ``num_images`` (encoder inputs: tiles with tiling), ``num_text_tokens`` and
      ``attention_pairs``, summed over the data-parallel group (TP/PP replicas hold the
      same batches and would count twice), read from the host copies of the batches so
      they cost no device sync; ``vision_imbalance``, the vision FLOPs of the busiest DP
      rank over the mean of the DP ranks (``vision_flops``; 1.0 without images); and
      ``data_wait_s``, the longest any DP rank waited for its loader this step;
    - ``start_step`` / ``throughput``: ``step_time_s``, ``tokens_per_s``, ``images_per_s``,
      ``data_wait_fraction`` (``data_wait_s / step_time_s``, at most 1),
      ``tflops_per_s_per_device``, ``mfu`` (NaN, written as null, without a known peak)
      and, on CUDA, ``peak_memory_gib``.

    ``losses``, ``moe_losses`` and ``batch_figures`` run collectives: every rank calls
    them, in the same order.
    """

    def __init__(
        self,
        cfg: MM1Config,
        *,
        device: torch.device,
        world_size: int,
        num_microbatches: int,
        peak_flops: Optional[float],
    ):
        self.cfg = cfg
        self.device = device
        self.world_size = world_size
        self.num_microbatches = num_microbatches
        self.peak_flops = peak_flops
        self.vision_weights = balance_weights(cfg.model, tile_size(cfg.data.tiling))
        self._start = time.perf_counter()
        forget_moe_aux_losses()  # another model's entries, sized for its layers

    def losses(self, reports: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Token-weighted mean loss per source over micro-batches and DP (x CP) ranks (each
        report entry a ``[sum, count]`` pair; DPO's count pairs)."""
        if not parallel_state.is_pipeline_last_stage():
            return {}
        # The loss function's report names (the same on every rank): per-source losses,
        # or DPO's figures (training/preference.py).
        names = list(reports[0]) if reports else ["loss"] + [f"loss/{n}" for n in SOURCE_IDS]
        totals = torch.zeros(len(names), 2, device=self.device)
        for report in reports:
            totals += torch.stack([report[name] for name in names])
        # Context-parallel ranks each hold a share of every sequence's tokens and losses.
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        all_reduce_(totals, group=group)
        return {
            name: (float(totals[i, 0] / totals[i, 1]) if totals[i, 1] > 0 else float("nan"))
            for i, name in enumerate(names)
        }

    def moe_losses(self) -> Dict[str, float]:
        """Router losses averaged over MoE layers and micro-batches (collective over PP)."""
        llm = self.cfg.model.llm
        if llm.moe.num_experts == 0:
            return {}
        names = [
            name
            for name, coeff in (
                ("load_balancing_loss", llm.moe.aux_loss_coeff),
                ("z_loss", llm.moe.z_loss_coeff),
            )
            if coeff > 0
        ]
        values = collect_moe_aux_losses(names, num_layers=llm.num_layers, device=self.device)
        num_moe_layers = max(1, sum(moe_layer_flags(llm)))
        return {
            f"moe/{name}": float(layer_values.sum()) / num_moe_layers / self.num_microbatches
            for name, layer_values in values.items()
        }

    def batch_figures(
        self,
        data,
        host_batches: Sequence[Dict[str, torch.Tensor]],
        *,
        data_wait_s: float,
    ) -> Dict[str, float]:
        """``data/*`` of the loader ``data``, the step's image, text token and attention
        pair counts, ``vision_imbalance`` and ``data_wait_s`` over the data-parallel group;
        ``data_wait_s``: the seconds this rank waited for ``host_batches``."""
        group = parallel_state.get_data_parallel_group()
        figures = data_metrics(data, host_batches, group=group)
        flops = vision_flops(host_batches, self.vision_weights)
        # One all-reduce for the sums, one for the maxima.
        counts = all_reduce_values(
            [
                sum(int(b["num_images"].sum()) for b in host_batches),
                sum(int(b["loss_mask"].sum()) for b in host_batches),
                sum(causal_attention_pairs(b["document_ids"]) for b in host_batches),
                flops,
            ],
            group=group,
        )
        max_flops, max_wait = all_reduce_values([flops, data_wait_s], op="max", group=group)
        figures["num_images"], figures["num_text_tokens"], figures["attention_pairs"] = counts[:3]
        figures["vision_imbalance"] = vision_imbalance(
            max_flops, counts[3], parallel_state.get_data_parallel_world_size()
        )
        figures["data_wait_s"] = max_wait
        return figures

    def start_step(self) -> None:
        """Start the clock that ``throughput`` reads."""
        self._start = time.perf_counter()

    def throughput(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """Speed figures of the step since ``start_step``, from its ``metrics`` counts."""
        seconds = time.perf_counter() - self._start
        t = self.cfg.training
        flops = training_flops_per_step(
            self.cfg.model,
            num_sequences=t.global_batch_size,
            seq_length=t.seq_length,
            num_images=int(metrics["num_images"]),
            attention_pairs=int(metrics["attention_pairs"]),
            image_size=tile_size(self.cfg.data.tiling),
        )
        figures = {
            "step_time_s": seconds,
            "tokens_per_s": t.global_batch_size * t.seq_length / seconds,
            "images_per_s": metrics["num_images"] / seconds,
            # Clocks start per rank: the slowest loader's wait may exceed this rank's step.
            "data_wait_fraction": min(1.0, metrics["data_wait_s"] / seconds),
            "tflops_per_s_per_device": flops / seconds / self.world_size / 1e12,
            "mfu": model_flops_utilization(flops, seconds, self.world_size, self.peak_flops or 0.0),
        }
        if self.device.type == "cuda":  # this rank's high-water mark since start-up
            figures["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return figures


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_bar(step: int, total: int, width: int = 20) -> str:
    filled = int(width * step / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {step}/{total}"


# The console line's figures: (scalar, label, format spec, unit), in order.
CONSOLE_FIGURES = (
    ("loss", "loss", ".4g", ""),
    ("lr", "lr", ".4g", ""),
    ("grad_norm", "grad_norm", ".4g", ""),
    ("tokens_per_s", "tokens_per_s", ".4g", ""),
    ("images_per_s", "images_per_s", ".4g", ""),
    ("vision_imbalance", "vision max/mean", ".2f", ""),
    ("data_wait_s", "data wait", ".2f", "s"),
    ("mfu", "mfu", ".4g", ""),
)


class MetricsLogger:
    """Logs every ``log_interval`` steps; a no-op on ranks other than the logging rank."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        log_interval: int,
        tensorboard: bool,
        progress_bar: bool,
        append: bool = False,
        trackers: Sequence = (),
    ):
        self.enabled = enabled
        self.trackers = list(trackers)  # training/trackers.py: W&B, MLflow
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.show_progress = progress_bar
        self.start_time = time.monotonic()
        self.writer = None
        self.jsonl = None
        if enabled:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            # One JSON object per step: easy to diff and plot across runs of a study.
            # A resumed run appends to the curve it continues.
            self.jsonl = open(
                Path(output_dir) / "metrics.jsonl", "a" if append else "w", encoding="utf-8"
            )
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {
            name: None if isinstance(value, float) and math.isnan(value) else value
            for name, value in scalars.items()
        }
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        finite = {
            name: value
            for name, value in scalars.items()
            if value is not None and not math.isnan(value)
        }
        if self.writer is not None:
            for name, value in finite.items():
                self.writer.add_scalar(name, value, step)
        for tracker in self.trackers:
            tracker.log(step, finite)
        if step % self.log_interval == 0 or step == self.total_steps:
            logger.info(self._console_line(step, scalars))

    def log_evaluation(self, step: int, rows) -> None:
        """A periodic evaluation's few-shot scores as a table, to the trackers."""
        if self.enabled and rows:
            for tracker in self.trackers:
                tracker.log_evaluation(step, rows)

    def _console_line(self, step: int, scalars: Dict[str, float]) -> str:
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        head = progress_bar(step, self.total_steps) if self.show_progress else f"step {step}"
        parts = [
            f"{label} {format(scalars[name], spec)}{unit}"
            for name, label, spec, unit in CONSOLE_FIGURES
            if name in scalars and scalars[name] is not None and not math.isnan(scalars[name])
        ]
        return f"{head} | " + " | ".join(parts) + f" | eta {_format_seconds(eta)}"

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None


def log_run_start(cfg, param_counts, *, peak_lr, num_microbatches, dp_size, step) -> None:
    """The run's size and layout, and its LoRA adapters, logged as training starts."""
    logger.info(
        "parameters: %s total (vision %s, connector %s, LLM %s); peak LR %.3g; "
        "%d micro-batches per step; DP=%d; CP=%d; starting at step %d",
        f"{param_counts.total:,}",
        f"{param_counts.vision_encoder:,}",
        f"{param_counts.connector:,}",
        f"{param_counts.language_model:,}",
        peak_lr,
        num_microbatches,
        dp_size,
        cfg.parallel.context_parallel_size,
        step,
    )
    if cfg.model.lora.enabled:
        lora = cfg.model.lora
        adapters = lora_parameters(cfg.model)
        logger.info(
            "LoRA rank %d on %s: %s adapter parameters (%.2f%% of the base), base frozen%s",
            lora.rank,
            ", ".join(lora.parts),
            f"{adapters:,}",
            100 * adapters / param_counts.total,
            f"; trained in full: {', '.join(lora.fully_trained)}" if lora.fully_trained else "",
        )
