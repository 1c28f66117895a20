"""The few-shot protocol: prompt templates, demonstration choice, generation settings.

Versioned (``PROTOCOL_VERSION``) and written into every result, since scores move with
any of it. MM1 does not publish its templates; the defaults are OpenFlamingo's:

- captioning: ``<image>Output: {answer}\\n`` per demonstration, then ``<image>Output:``;
- VQA: ``<image>Question: {question} Short answer: {answer}\\n``, then the question with
  ``Short answer:`` left open;
- the synthetic tasks use the synthetic world's own words (its tokenizer knows no others):
  ``<image> {answer}`` and ``<image> {question} {answer}``.

A demonstration's answer is its first reference caption, or for VQA the answer most
annotators gave (ties: the first given). Demonstrations are drawn per query, without
replacement, from the task's train split by a generator seeded with (seed, task, query
id), so a query's prompt does not depend on how queries are sharded or batched; or, with
``demo_selection="similar"``, the train images most similar to the query's by the model's
own encoder (``retrieval.py``). Zero-shot
prompts can carry OpenFlamingo's two text-only demonstrations (``text_demos_at_zero``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from mm1_megatron.evaluation.tasks.records import EvalExample

PROTOCOL_VERSION = "mm1-fewshot-2"
DEMO_SELECTIONS = ("random", "similar")
IMAGE = "<image>"


@dataclass(frozen=True)
class Template:
    demo: str  # with {answer} (and {question} for VQA)
    query: str  # with {question} for VQA

    def __post_init__(self):
        for name in ("demo", "query"):
            if getattr(self, name).count(IMAGE) != 1:
                raise ValueError(f"a template's {name} needs exactly one {IMAGE}: {self!r}")


TEMPLATES: Dict[str, Template] = {
    "caption": Template("<image>Output: {answer}\n", "<image>Output:"),
    "vqa": Template(
        "<image>Question: {question} Short answer: {answer}\n",
        "<image>Question: {question} Short answer:",
    ),
    "synthetic_caption": Template("<image> {answer}", "<image>"),
    "synthetic_vqa": Template("<image> {question} {answer}", "<image> {question}"),
    # A clip's <image> stands for its frames, each after its frame-time marker.
    "synthetic_video_qa": Template("<image> {question} {answer}", "<image> {question}"),
}

# (max new tokens, beams) per template key; OpenFlamingo decodes captions to 20 tokens and
# VQA answers to 5, with 3 beams. Synthetic captions run to about 35 words; a synthetic
# answer is one word.
GENERATION: Dict[str, Dict[str, int]] = {
    "caption": {"max_new_tokens": 20, "num_beams": 3},
    "vqa": {"max_new_tokens": 5, "num_beams": 3},
    "synthetic_caption": {"max_new_tokens": 40, "num_beams": 1},
    "synthetic_vqa": {"max_new_tokens": 1, "num_beams": 1},
    "synthetic_video_qa": {"max_new_tokens": 1, "num_beams": 1},
}

# Text that ends an answer (the stop token itself is not part of it), besides the end of
# sequence. OpenFlamingo stops at a line break. A synthetic caption is one sentence ending
# with its only "." (``data/synthetic/world.py``); after it, a model that has seen several
# captioned pictures in one document may well go on to the next picture.
STOP_TEXT: Dict[str, str] = {"caption": "\n", "vqa": "\n", "synthetic_caption": "."}


@dataclass(frozen=True)
class Protocol:
    seed: int = 0
    demo_selection: str = "random"  # or "similar": by image similarity (evaluation/retrieval.py)
    text_demos_at_zero: bool = False
    templates: Dict[str, Template] = field(default_factory=lambda: dict(TEMPLATES))
    version: str = PROTOCOL_VERSION

    def __post_init__(self):
        if self.demo_selection not in DEMO_SELECTIONS:
            raise ValueError(
                f"demo_selection={self.demo_selection!r}; expected one of {DEMO_SELECTIONS}"
            )

    def template_key(self, task_name: str, family: str) -> str:
        return task_name if task_name in self.templates else family

    def describe(self) -> Dict:
        return {
            "version": self.version,
            "seed": self.seed,
            "demo_selection": self.demo_selection,
            "text_demos_at_zero": self.text_demos_at_zero,
            "templates": {k: {"demo": t.demo, "query": t.query} for k, t in self.templates.items()},
            "generation": GENERATION,
            "stop_text": STOP_TEXT,
        }


def demo_answer(example: EvalExample, family: str) -> str:
    if family == "caption":
        return example.references[0]
    counts = Counter(example.references)
    top = max(counts.values())
    return next(answer for answer in example.references if counts[answer] == top)


def _query_rng(seed: int, task_name: str, example_id: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}/{task_name}/{example_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def choose_demos(
    pool: Sequence[EvalExample],
    shots: int,
    *,
    seed: int,
    task_name: str,
    query: EvalExample,
    ranked: Optional[Sequence[int]] = None,
) -> List[EvalExample]:
    """``shots`` demonstrations for ``query``: random, or the first of ``ranked`` (pool
    indices, most similar first) for retrieval. Never the query itself."""
    if shots > len(pool):
        raise ValueError(
            f"{task_name}: {shots} shots need {shots} demonstrations, but its train split "
            f"has {len(pool)}; use fewer shots"
        )
    if shots == 0:
        return []
    if ranked is not None:
        order = list(ranked)
    else:
        order = _query_rng(seed, task_name, query.example_id).permutation(len(pool)).tolist()
    chosen = [pool[i] for i in order if pool[i].example_id != query.example_id]
    return chosen[:shots]


def text_segments(
    template: Template, demos: Sequence[EvalExample], query: EvalExample, family: str
) -> List[str]:
    """The prompt as text pieces split at the images: ``len(demos) + 1`` images sit
    between consecutive pieces."""
    text = "".join(
        template.demo.format(question=d.question or "", answer=demo_answer(d, family))
        for d in demos
    )
    text += template.query.format(question=query.question or "")
    return text.split(IMAGE)


def text_only_demos(template: Template, demos: Sequence[EvalExample], family: str) -> str:
    """OpenFlamingo's zero-shot trick: demonstrations with their image removed."""
    return "".join(
        template.demo.replace(IMAGE, "").format(
            question=d.question or "", answer=demo_answer(d, family)
        )
        for d in demos
    )
