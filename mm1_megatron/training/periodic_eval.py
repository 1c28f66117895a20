"""Evaluation during training, every ``eval.interval`` steps and after the last step.

Two measurements, logged with the step's metrics (``metrics.jsonl``, TensorBoard) and
recorded in the next checkpoint:

- ``heldout/loss`` and ``heldout/loss/<source>``: the training loss (same forward step,
  same per-token weighting) on ``eval.heldout_batches`` micro-batches per data-parallel
  rank that training never sees: a synthetic stream with its own seed, or
  ``eval.heldout_shards`` for webdataset runs. The same batches every time, so the curve
  moves only with the model.
- ``eval/<task>/<shots>shot``: few-shot scores of ``eval.tasks`` on a fixed seeded subset
  of ``eval.limit`` examples: the ``EvalPlan`` of the config's ``eval`` section, which
  ``mm1 eval`` builds from the same config, through the same evaluator.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable, Dict, List

from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from mm1_megatron.batch import model_inputs
from mm1_megatron.checkpoint import unwrap
from mm1_megatron.config import MM1Config
from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.evaluation.evaluator import ShotEvaluator
from mm1_megatron.evaluation.plan import EvalPlan
from mm1_megatron.evaluation.prompting import PromptBuilder
from mm1_megatron.training.step import document_split

logger = logging.getLogger(__name__)

# Held-out synthetic sequences come from seed + this: a stream no training run reads.
HELDOUT_SEED_OFFSET = 7_919_000_003


class PeriodicEvaluation:
    def __init__(
        self,
        cfg: MM1Config,
        tokenizer: Tokenizer,
        model_chunks: List,
        forward_step: Callable,
        reduce_reports: Callable,
        device,
        overlap_param_gather: bool = False,
    ):
        self.cfg, self.tokenizer, self.model_chunks = cfg, tokenizer, model_chunks
        self.forward_step, self.reduce_reports, self.device = forward_step, reduce_reports, device
        self.overlap_param_gather = overlap_param_gather
        # Tasks load (and their files are checked) now, before the first step.
        self.plan = EvalPlan.from_config(cfg)
        self.tasks = self.plan.load_tasks()
        self.last: Dict[str, float] = {}

    def due(self, step: int) -> bool:
        interval = self.cfg.eval.interval
        return interval > 0 and (step % interval == 0 or step == self.cfg.training.train_steps)

    def run(self, step: int) -> Dict[str, float]:
        start = time.perf_counter()
        for chunk in self.model_chunks:
            chunk.eval()
        try:
            metrics = {}
            if self.cfg.eval.heldout_batches > 0:
                metrics.update(self._heldout_loss())
            metrics.update(self._few_shot())
        finally:
            for chunk in self.model_chunks:
                chunk.train()
        metrics["eval/seconds"] = time.perf_counter() - start
        self.last = {"step": step, **metrics}
        logger.info("evaluation at step %d: %s", step, _summary(metrics))
        return metrics

    def _heldout_data(self):
        cfg = self.cfg
        shards = cfg.eval.heldout_shards if cfg.data.source == "webdataset" else cfg.data.shards
        data = dataclasses.replace(cfg.data, shards=shards, num_workers=0)
        loader, _ = build_run_data(
            cfg,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            data=data,
            seed=cfg.training.seed + HELDOUT_SEED_OFFSET,
        )
        return loader

    def _heldout_loss(self) -> Dict[str, float]:
        count = self.cfg.eval.heldout_batches
        loader = self._heldout_data()
        with_images = parallel_state.is_pipeline_first_stage()
        split = document_split(self.cfg, self.tokenizer)
        batches = (
            model_inputs(next(loader), self.device, images=with_images, documents=split)
            for _ in range(count)
        )
        reports = get_forward_backward_func()(
            forward_step_func=self.forward_step,
            data_iterator=batches,
            model=self.model_chunks,
            num_microbatches=count,
            seq_length=self.cfg.training.seq_length,
            micro_batch_size=self.cfg.training.micro_batch_size,
            forward_only=True,
        )
        return {f"heldout/{name}": value for name, value in self.reduce_reports(reports).items()}

    def _few_shot(self) -> Dict[str, float]:
        if not self.tasks:
            return {}
        if len(self.model_chunks) != 1:
            raise ValueError("few-shot evaluation during training needs one model chunk")
        if self.overlap_param_gather:  # the last step's all-gather waits for a forward
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)
        evaluator = ShotEvaluator(
            unwrap(self.model_chunks[0]),
            PromptBuilder(self.cfg, self.tokenizer),
            self.tokenizer,
            self.plan.protocol,
        )
        scores = {}
        for task in self.tasks:
            for shots in self.plan.shots:
                result = evaluator.run(task, shots, self.plan.decoding)
                scores[f"eval/{task.name}/{shots}shot"] = result.score
        return scores


def _summary(metrics: Dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
