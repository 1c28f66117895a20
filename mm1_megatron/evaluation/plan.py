"""What a few-shot evaluation runs, read once from the validated config's ``eval`` section.

``mm1 eval`` (``evaluation/cli.py``) and evaluation during training
(``training/periodic_eval.py``) both build an ``EvalPlan`` with ``EvalPlan.from_config``
and load its tasks with ``load_tasks``, so the same config evaluates the same examples
with the same prompts and decoding, and the checks on tasks and shot counts are written
once, here. Problems are ``ValueError``s that name the ``eval.*`` field to change.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import List, Optional, Tuple

from mm1_megatron.config import MM1Config
from mm1_megatron.evaluation.evaluator import DecodeSettings
from mm1_megatron.evaluation.protocol import Protocol
from mm1_megatron.evaluation.tasks import TASK_NAMES, Task, load_task


@dataclass(frozen=True)
class EvalPlan:
    tasks: Tuple[str, ...]  # eval.tasks, in order
    shots: Tuple[int, ...]  # eval.shots, in order
    limit: Optional[int]  # a seeded subset of each task (None: every example)
    task_paths: Optional[str]  # the dataset files YAML of the official tasks
    on_bad: str  # a bad dataset entry: "stop" or "skip"
    protocol: Protocol  # prompts and demonstrations (its seed also draws the subset)
    decoding: DecodeSettings

    @classmethod
    def from_config(cls, cfg: MM1Config) -> EvalPlan:
        """The plan of ``cfg.eval`` (a config ``validate_config`` accepted); an unknown
        task name is refused here, with the valid names."""
        e = cfg.eval
        unknown = [name for name in e.tasks if name not in TASK_NAMES]
        if unknown:
            named = ", ".join(_with_hint(name) for name in unknown)
            raise ValueError(
                f"eval.tasks: unknown task{'s' if len(unknown) > 1 else ''} {named}. "
                f"Valid tasks: {', '.join(TASK_NAMES)}"
            )
        return cls(
            tasks=tuple(e.tasks),
            shots=tuple(e.shots),
            limit=e.limit,
            task_paths=e.task_paths,
            on_bad=e.on_bad,
            protocol=Protocol(
                seed=e.seed if e.seed is not None else cfg.training.seed,
                demo_selection=e.demo_selection,
                text_demos_at_zero=e.text_demos_at_zero,
            ),
            decoding=DecodeSettings(
                batch_size=e.batch_size,
                num_beams=e.num_beams,
                max_new_tokens=e.max_new_tokens,
                vqa_mode=e.vqa_mode,
            ),
        )

    @property
    def seed(self) -> int:
        return self.protocol.seed

    def load_tasks(self) -> List[Task]:
        """Every task read and checked (files, images, demonstrations for the largest shot
        count) before anything is generated."""
        tasks = [
            load_task(name, self.task_paths, on_bad=self.on_bad, limit=self.limit, seed=self.seed)
            for name in self.tasks
        ]
        most = max(self.shots, default=0)
        for task in tasks:
            if most > len(task.demo_examples):
                raise ValueError(
                    f"eval.shots={list(self.shots)}: {most} shots need {most} demonstrations, "
                    f"but {task.name}'s train split has {len(task.demo_examples)}; use at "
                    f"most {len(task.demo_examples)} shots"
                )
        return tasks


def _with_hint(name: str) -> str:
    close = difflib.get_close_matches(name, TASK_NAMES, n=1)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)
