"""What a task reader produces: evaluation examples, demonstrations and a skip count."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Tuple, Union

from mm1_megatron.data.synthetic.video import Clip
from mm1_megatron.data.synthetic.world import Scene

Family = Literal["caption", "vqa"]
Metric = Literal["cider", "vqa_accuracy"]


@dataclass(frozen=True)
class EvalExample:
    """One image (or video) with its references (and, for VQA, its question).

    ``example_id`` is the image id for caption tasks and the question id (as a string) for
    VQA tasks (VizWiz: the image file name, its only id). ``image`` is an image file,
    decoded like training shards, a synthetic ``Scene``, drawn like training images, or a
    synthetic video ``Clip``, whose frames are drawn alike and prompted after their
    frame-time markers as in training.
    ``references`` are the reference captions, or the raw annotator answers for VQA
    (10 for VQAv2-style datasets; fewer where annotators gave fewer).
    """

    example_id: str
    image: Union[Path, Scene, Clip]
    references: Tuple[str, ...]
    question: Optional[str] = None


@dataclass
class Task:
    """A loaded task: ``demo_examples`` come from the task's train split.

    ``skipped`` maps a reason (``"<split>: <what>"``, e.g. ``"eval: missing image file"``)
    to how many entries were skipped for it; empty unless loaded with ``on_bad="skip"``.
    """

    name: str
    family: Family
    metric: Metric
    eval_examples: List[EvalExample]
    demo_examples: List[EvalExample]
    skipped: Dict[str, int] = field(default_factory=dict)


def id_sort_key(example_id: str) -> Tuple[int, int, str]:
    """Numeric ids in numeric order, before all other ids in string order."""
    if example_id.isdigit():
        return (0, int(example_id), "")
    return (1, 0, example_id)


def sort_by_id(examples: List[EvalExample]) -> List[EvalExample]:
    """``examples`` ordered by id, so that sharding them across ranks is stable."""
    return sorted(examples, key=lambda example: id_sort_key(example.example_id))
