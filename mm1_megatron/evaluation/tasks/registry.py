"""The evaluation tasks by name, and ``load_task``: read, check, order and subsample one."""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from mm1_megatron.evaluation.tasks import captions, synthetic, vqa
from mm1_megatron.evaluation.tasks.paths import TaskPaths, load_task_paths
from mm1_megatron.evaluation.tasks.problems import ON_BAD_CHOICES, OnBad, Problems
from mm1_megatron.evaluation.tasks.records import EvalExample, Family, Metric, Task, sort_by_id

logger = logging.getLogger(__name__)

Examples = List[EvalExample]
Reader = Callable[[TaskPaths, Problems], Tuple[Examples, Examples]]
SyntheticReader = Callable[[int, int], Tuple[Examples, Examples]]
SUBSET_TAG = 0x53554253  # "SUBS": the stream that picks a ``limit``-sized subset
PathsLike = Union[TaskPaths, str, Path, Mapping[str, Any]]


@dataclass(frozen=True)
class TaskSpec:
    """A task's family and metric, and what reads it: official files or the synthetic world."""

    family: Family
    metric: Metric
    reader: Optional[Reader] = None
    synthetic: Optional[SyntheticReader] = None


TASKS: Dict[str, TaskSpec] = {
    "coco_karpathy": TaskSpec("caption", "cider", captions.read_karpathy),
    "coco_val2014": TaskSpec("caption", "cider", captions.read_coco_val2014),
    "nocaps": TaskSpec("caption", "cider", captions.read_nocaps),
    "textcaps": TaskSpec("caption", "cider", captions.read_textcaps),
    "vqav2": TaskSpec("vqa", "vqa_accuracy", vqa.read_vqav2),
    "textvqa": TaskSpec("vqa", "vqa_accuracy", vqa.read_textvqa),
    "vizwiz": TaskSpec("vqa", "vqa_accuracy", vqa.read_vizwiz),
    "okvqa": TaskSpec("vqa", "vqa_accuracy", vqa.read_okvqa),
    "synthetic_caption": TaskSpec("caption", "cider", synthetic=synthetic.synthetic_caption),
    "synthetic_vqa": TaskSpec("vqa", "vqa_accuracy", synthetic=synthetic.synthetic_vqa),
    "synthetic_video_qa": TaskSpec("vqa", "vqa_accuracy", synthetic=synthetic.synthetic_video_qa),
}
TASK_NAMES: Tuple[str, ...] = tuple(TASKS)


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name``; a ValueError listing the valid names otherwise."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASK_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Valid tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def _as_task_paths(paths: Optional[PathsLike], name: str) -> TaskPaths:
    if paths is None:
        raise ValueError(f"task {name!r} reads official dataset files: give its paths YAML")
    if isinstance(paths, TaskPaths):
        return paths
    if isinstance(paths, (str, Path)):
        return load_task_paths(paths)
    return TaskPaths.from_mapping(paths)


def subset(examples: Examples, limit: Optional[int], seed: int) -> Examples:
    """``limit`` examples drawn at random (by ``seed``), kept in their order; all if fewer."""
    if limit is None or len(examples) <= limit:
        return examples
    rng = np.random.default_rng([seed, SUBSET_TAG])
    chosen = np.sort(rng.choice(len(examples), size=limit, replace=False))
    return [examples[int(i)] for i in chosen]


def load_task(
    name: str,
    paths: Optional[PathsLike] = None,
    *,
    on_bad: OnBad = "stop",
    limit: Optional[int] = None,
    seed: int = 0,
) -> Task:
    """Read task ``name``: every file and image checked before anything is generated.

    ``paths``: a ``TaskPaths``, a paths YAML file or a key -> path mapping (unused by the
    synthetic tasks). ``on_bad``: ``"stop"`` raises one ValueError listing bad entries
    (malformed, or with a missing image file); ``"skip"`` drops them, counted in
    ``Task.skipped``. ``limit``: at most this many evaluation examples, a random subset
    drawn by ``seed`` (the synthetic tasks draw exactly ``limit``, default 200, scenes from
    ``seed``). Both lists are ordered by id, so sharding them across ranks is stable.
    """
    spec = task_spec(name)
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad={on_bad!r} must be one of {ON_BAD_CHOICES}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be >= 1 (or None for every example)")
    skipped: Dict[str, int] = {}
    if spec.synthetic is not None:
        eval_examples, demos = spec.synthetic(seed, limit or synthetic.DEFAULT_NUM_EVAL)
    else:
        assert spec.reader is not None
        problems = Problems()
        eval_examples, demos = spec.reader(_as_task_paths(paths, name), problems)
        skipped = problems.resolve(name, on_bad)
        eval_examples = subset(sort_by_id(eval_examples), limit, seed)
    if not eval_examples:
        raise ValueError(f"task {name}: no evaluation examples left (skipped: {skipped})")
    eval_examples, demos = sort_by_id(eval_examples), sort_by_id(demos)
    task = Task(name, spec.family, spec.metric, eval_examples, demos, skipped)
    logger.info(
        "task %s: %d evaluation examples, %d demonstrations",
        name,
        len(task.eval_examples),
        len(task.demo_examples),
    )
    return task
