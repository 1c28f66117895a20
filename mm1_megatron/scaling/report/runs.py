"""One training run's output folder as a typed record: its loss curve against tokens and
training FLOPs, its size, throughput, final loss and evaluation scores.

Definitions (also in ``docs/scaling.md``):

- tokens: sequence positions processed, ``global_batch_size x seq_length`` per step
  (padding included, as ``tokens_per_s``); ``loss_tokens`` counts the tokens the loss saw.
- training FLOPs: ``training.flops.training_flops_per_step``, the count MFU uses, from the
  saved config and each step's logged ``num_images`` and ``attention_pairs``, summed over
  steps; a logged step stands for the steps since the previous logged one.
- final training loss: the mean of the last finite training losses: the last 10% of
  them, at most ``last_k`` (20: the README's convention for 300-step runs), at least one;
  held-out loss: ``heldout/loss`` logged at the run's last step (``eval.interval``).
- MFU and TFLOP/s per device: medians over the second half of the logged steps.
- status: ``complete`` (logged ``training.train_steps``), ``incomplete`` (fewer: still
  running, stopped or failed), ``no_metrics``, ``unreadable`` or ``missing``.
"""

from __future__ import annotations

import bisect
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from mm1_megatron.data.pipeline.tiling import tile_size
from mm1_megatron.models.param_count import count_parameters
from mm1_megatron.scaling.report import run_files
from mm1_megatron.training.flops import training_flops_per_step

logger = logging.getLogger(__name__)

LOSS_KINDS = ("train", "heldout")
DEFAULT_LAST_K = 20
FINAL_LOSS_FRACTION = 0.1


@dataclass
class RunRecord:
    name: str
    path: Path
    status: str
    notes: List[str] = field(default_factory=list)
    label: Optional[str] = None  # e.g. the sweep's model-size label
    sweep_status: Optional[str] = None
    sweep_meta: Dict[str, object] = field(default_factory=dict)
    target_steps: Optional[int] = None
    steps: List[int] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)  # NaN where none was logged
    tokens: List[float] = field(default_factory=list)  # cumulative, at each step
    flops: List[float] = field(default_factory=list)  # cumulative; empty when unknown
    loss_tokens: Optional[float] = None
    params_total: Optional[int] = None
    params_llm_active_non_embedding: Optional[int] = None
    train_loss: Optional[float] = None
    train_loss_window: int = 0
    heldout_loss: Optional[float] = None
    mfu: Optional[float] = None
    tflops_per_device: Optional[float] = None
    train_seconds: Optional[float] = None
    eval_scores: Dict[str, float] = field(default_factory=dict)
    eval_source: str = ""
    eval_step: Optional[int] = None  # the step the scores were measured at
    num_bad_lines: int = 0

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0

    @property
    def total_tokens(self) -> Optional[float]:
        return self.tokens[-1] if self.tokens else None

    @property
    def total_flops(self) -> Optional[float]:
        return self.flops[-1] if self.flops else None

    def flops_at(self, step: int) -> Optional[float]:
        """Cumulative training FLOPs at the last logged step up to ``step``."""
        index = bisect.bisect_right(self.steps, step) - 1
        return self.flops[index] if self.flops and index >= 0 else None

    def params(self, kind: str = "total") -> Optional[int]:
        return self.params_total if kind == "total" else self.params_llm_active_non_embedding

    def final_loss(self, kind: str) -> Optional[float]:
        if kind not in LOSS_KINDS:
            raise ValueError(f"loss kind {kind!r}: choose one of {', '.join(LOSS_KINDS)}")
        return self.train_loss if kind == "train" else self.heldout_loss


def _median_of_second_half(records: List[Dict], key: str) -> Optional[float]:
    values = [run_files.finite(r.get(key)) for r in records[len(records) // 2 :]]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cumulative_flops(config, records: List[Dict]) -> List[float]:
    """Cumulative training FLOPs at each record's step, or [] when a count is missing."""
    t = config.training
    total, previous_step, cumulative = 0.0, 0, []
    for record in records:
        num_images = run_files.finite(record.get("num_images"))
        pairs = run_files.finite(record.get("attention_pairs"))
        if num_images is None or pairs is None:
            return []
        per_step = training_flops_per_step(
            config.model,
            num_sequences=t.global_batch_size,
            seq_length=t.seq_length,
            num_images=int(num_images),
            attention_pairs=int(pairs),
            image_size=tile_size(config.data.tiling),
        )
        total += per_step * (record["step"] - previous_step)
        previous_step = record["step"]
        cumulative.append(total)
    return cumulative


def _fill_curves(record: RunRecord, config, records: List[Dict], last_k: int) -> None:
    t = config.training
    record.steps = [r["step"] for r in records]
    record.losses = [
        math.nan if run_files.finite(r.get("loss")) is None else float(r["loss"]) for r in records
    ]
    record.tokens = [float(step * t.global_batch_size * t.seq_length) for step in record.steps]
    record.flops = _cumulative_flops(config, records)
    if not record.flops:
        record.notes.append("FLOPs unknown: steps without num_images/attention_pairs")
    loss_tokens = [run_files.finite(r.get("num_text_tokens")) for r in records]
    if all(v is not None for v in loss_tokens):
        record.loss_tokens = sum(loss_tokens)
    finite_losses = [v for v in record.losses if not math.isnan(v)]
    if finite_losses:
        size = min(last_k, max(1, math.ceil(FINAL_LOSS_FRACTION * len(finite_losses))))
        window = finite_losses[-size:]
        record.train_loss, record.train_loss_window = statistics.fmean(window), len(window)
    last = records[-1]
    record.heldout_loss = run_files.finite(last.get("heldout/loss"))
    record.mfu = _median_of_second_half(records, "mfu")
    record.tflops_per_device = _median_of_second_half(records, "tflops_per_s_per_device")
    times = [run_files.finite(r.get("step_time_s")) for r in records]
    known = [v for v in times if v is not None]
    record.train_seconds = sum(known) if known else None


def _fill_eval_scores(record: RunRecord, records: List[Dict]) -> None:
    path, step, scores = run_files.read_eval_results(record.path)
    if scores:
        record.eval_scores, record.eval_step = scores, step
        record.eval_source = str(path.relative_to(record.path))
        return
    for r in reversed(records):
        scores = run_files.scores_from_record(r)
        if scores:
            record.eval_scores, record.eval_step = scores, r["step"]
            record.eval_source = f"metrics step {r['step']}"
            return


def load_run(folder, *, name: Optional[str] = None, last_k: int = DEFAULT_LAST_K) -> RunRecord:
    """Read one run folder. Raises ``ValueError`` (naming the folder) when it is not a
    folder or its config is unreadable; a run without metrics, or with fewer steps than
    configured, is returned with that status."""
    if last_k < 1:
        raise ValueError(f"last_k={last_k}: average the final loss over at least 1 step")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"run folder {folder} does not exist or is not a folder")
    config = run_files.read_config(folder)
    counts = count_parameters(config.model)
    record = RunRecord(
        name=name or folder.resolve().name,
        path=folder,
        status="no_metrics",
        target_steps=config.training.train_steps,
        params_total=counts.total,
        params_llm_active_non_embedding=counts.llm_active_non_embedding,
    )
    records, record.num_bad_lines, source = run_files.read_step_records(folder)
    if record.num_bad_lines:
        record.notes.append(f"{record.num_bad_lines} unreadable metrics line(s) skipped")
    if source == run_files.TENSORBOARD_DIR:
        record.notes.append("read from TensorBoard (no metrics.jsonl)")
    if not records:
        record.notes.append("no metrics logged")
        return record
    _fill_curves(record, config, records, last_k)
    _fill_eval_scores(record, records)
    record.status = "complete" if record.last_step >= record.target_steps else "incomplete"
    if record.status == "incomplete":
        record.notes.append(f"{record.last_step} of {record.target_steps} steps logged")
    return record


def unreadable_run(folder: Path, name: str, status: str, reason: str) -> RunRecord:
    """A record for a run the report lists but cannot read (``unreadable``, ``missing``)."""
    return RunRecord(name=name, path=Path(folder), status=status, notes=[reason])


def collect_runs(folders, *, last_k: int = DEFAULT_LAST_K) -> List[RunRecord]:
    """Records of several run folders; an unreadable one is kept with its status and the
    reason. Names are the folder names (with the parent folder when two coincide)."""
    folders = [Path(f) for f in folders]
    names = [f.resolve().name for f in folders]
    records = []
    for folder, name in zip(folders, names):
        if names.count(name) > 1:
            name = f"{folder.resolve().parent.name}/{name}"
        try:
            records.append(load_run(folder, name=name, last_k=last_k))
        except ValueError as exc:
            logger.warning("%s", exc)
            records.append(unreadable_run(folder, name, "unreadable", str(exc)))
    return records
