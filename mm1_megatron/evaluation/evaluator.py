"""Evaluate one task at one shot count: prompts, generation, predictions, the score.

Queries are sharded over data-parallel ranks (query ``i`` to rank ``i % dp``); every rank
of a model replica generates the same batch together (TP/PP), and the predictions are
gathered over the data-parallel group, so each rank ends with all of them. With expert
parallelism the data-parallel ranks also run the same number of batches (a rank short
of queries repeats its last one and drops the result), because MoE layers exchange
tokens across them at every step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from megatron.core import parallel_state

from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.evaluation.metrics import cider_d, vqa_corpus_accuracy
from mm1_megatron.evaluation.prompting import PromptBuilder
from mm1_megatron.evaluation.protocol import GENERATION, STOP_TEXT, Protocol, choose_demos
from mm1_megatron.evaluation.retrieval import image_features, most_similar
from mm1_megatron.evaluation.tasks.records import EvalExample, Task
from mm1_megatron.inference import GenerationConfig, generate
from mm1_megatron.parallel.collectives import all_gather_objects

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    batch_size: int = 8
    num_beams: Optional[int] = None  # None: the protocol's per-task default
    max_new_tokens: Optional[int] = None
    vqa_mode: str = "official"  # answer normalisation of vqa_accuracy


@dataclass
class ShotResult:
    task: str
    shots: int
    metric: str
    score: float
    num_examples: int
    predictions: List[Dict] = field(default_factory=list)
    seconds: float = 0.0


def generation_config(key: str, settings: DecodeSettings, tokenizer: Tokenizer) -> GenerationConfig:
    defaults = GENERATION.get(key, GENERATION["caption"])
    stop_ids = tokenizer.encode(STOP_TEXT[key]) if key in STOP_TEXT else []
    stops = [tokenizer.eos_token_id] + (stop_ids if len(stop_ids) == 1 else [])
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens or defaults["max_new_tokens"],
        num_beams=settings.num_beams or defaults["num_beams"],
        stop_token_ids=tuple(stops),
        banned_token_ids=(tokenizer.image_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id),
        vocab_limit=tokenizer.vocab_size,
    )


def clean_prediction(text: str) -> str:
    """The answer as generated up to the first line break, without surrounding spaces."""
    return text.split("\n", 1)[0].strip()


def score(task: Task, predictions: Dict[str, str], settings: DecodeSettings):
    references = {ex.example_id: list(ex.references) for ex in task.eval_examples}
    if task.metric == "cider":
        return cider_d(references, predictions)
    return vqa_corpus_accuracy(predictions, references, mode=settings.vqa_mode)


class ShotEvaluator:
    """Runs ``(task, shots)`` pairs on one model replica set (all ranks call ``run``)."""

    def __init__(self, model, builder: PromptBuilder, tokenizer: Tokenizer, protocol: Protocol):
        self.model, self.builder, self.tokenizer, self.protocol = (
            model,
            builder,
            tokenizer,
            protocol,
        )
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        self._pool_features = {}
        ep = parallel_state.get_expert_model_parallel_world_size()
        self.lockstep_group = self.dp_group if ep > 1 else None

    def run(self, task: Task, shots: int, settings: DecodeSettings) -> ShotResult:
        start = time.perf_counter()
        key = self.protocol.template_key(task.name, task.family)
        template = self.protocol.templates[key]
        config = generation_config(key, settings, self.tokenizer)
        mine = task.eval_examples[self.dp_rank :: self.dp_size]
        per_rank = math.ceil(len(task.eval_examples) / self.dp_size)
        num_batches = math.ceil(per_rank / settings.batch_size)
        local: Dict[str, Dict] = {}
        for index in range(num_batches):
            batch = mine[index * settings.batch_size : (index + 1) * settings.batch_size]
            if not batch and self.lockstep_group is None:
                break
            queries = batch or mine[-1:] or task.eval_examples[:1]  # lockstep filler
            records = self._generate(task, shots, template, key, queries, config)
            if batch:
                local.update(records)
            logger.info(
                "%s %d-shot: batch %d/%d on data-parallel rank %d",
                task.name,
                shots,
                index + 1,
                num_batches,
                self.dp_rank,
            )
        merged: Dict[str, Dict] = {}
        for part in all_gather_objects(local, group=self.dp_group):
            merged.update(part)
        predictions = {i: r["prediction"] for i, r in merged.items()}
        corpus, per_id = score(task, predictions, settings)
        for example_id, record in merged.items():
            record["score"] = per_id[example_id]
        ordered = [merged[ex.example_id] for ex in task.eval_examples]
        return ShotResult(
            task.name,
            shots,
            task.metric,
            float(corpus),
            len(ordered),
            ordered,
            time.perf_counter() - start,
        )

    def _ranked_pools(self, task: Task, queries: Sequence[EvalExample], shots: int):
        """Per query, pool indices by image similarity (``demo_selection="similar"``)."""
        if self.protocol.demo_selection != "similar" or shots == 0:
            return [None] * len(queries)
        if task.name not in self._pool_features:
            self._pool_features[task.name] = image_features(
                self.model, task.demo_examples, self.builder.image, pack=self.builder.pack
            )
        query_features = image_features(
            self.model, queries, self.builder.image, pack=self.builder.pack
        )
        return most_similar(query_features, self._pool_features[task.name], shots + 1)

    def _generate(self, task, shots, template, key, queries: Sequence[EvalExample], config):
        prompts, demo_ids = [], []
        for query, ranked in zip(queries, self._ranked_pools(task, queries, shots)):
            demos = choose_demos(
                task.demo_examples,
                shots,
                seed=self.protocol.seed,
                task_name=task.name,
                query=query,
                ranked=ranked,
            )
            if ranked is not None:
                demos = demos[::-1]  # the most similar demonstration next to the query
            text_demos = []
            if shots == 0 and self.protocol.text_demos_at_zero:
                text_demos = choose_demos(
                    task.demo_examples,
                    2,
                    seed=self.protocol.seed,
                    task_name=task.name,
                    query=query,
                )
            prompts.append(self.builder.build(template, task.family, query, demos, text_demos))
            demo_ids.append([d.example_id for d in demos])
        outputs = generate(
            self.model,
            prompts,
            config,
            pad_token_id=self.tokenizer.pad_token_id,
            lockstep_group=self.lockstep_group,
        )
        records = {}
        for query, ids, demos, prompt in zip(queries, outputs, demo_ids, prompts):
            records[query.example_id] = {
                "id": query.example_id,
                "question": query.question,
                "prediction": clean_prediction(self.tokenizer.decode(ids)),
                "generated_ids": list(ids),
                "references": list(query.references),
                "demos": demos,
                "prompt_tokens": len(prompt.token_ids),
            }
        return records
