"""Readers of the VQA tasks' official files: VQAv2, OK-VQA, TextVQA and VizWiz.

Each reader returns ``(eval_examples, demo_examples)``: one example per question, whose
references are the raw annotator answers (however many there are; usually 10). Demos come
from each dataset's train split. Bad entries go to the ``Problems`` collector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mm1_megatron.evaluation.tasks.paths import TaskPaths
from mm1_megatron.evaluation.tasks.problems import (
    NO_ANNOTATION,
    MalformedEntry,
    Problems,
    entry_label,
    get_field,
    get_strings,
    item_fields,
    top_level,
)
from mm1_megatron.evaluation.tasks.records import EvalExample

Examples = List[EvalExample]
# split -> (COCO image folder key, the COCO split in the file names)
COCO_IMAGES = {
    "eval": ("coco_val2014_images", "val2014"),
    "demo": ("coco_train2014_images", "train2014"),
}


def _answers(entry: Any) -> Tuple[str, ...]:
    """The ``answer`` strings of ``entry["answers"]`` (a list of objects); never empty."""
    answers = tuple(item_fields(entry, "answers", "answer"))
    if not answers:
        raise MalformedEntry("has an empty 'answers' list")
    return answers


def _read_annotations(
    paths: TaskPaths, key: str, split: str, problems: Problems
) -> Dict[int, Optional[Tuple[str, ...]]]:
    """question_id -> answers; None for a malformed annotation (already reported)."""
    source = paths.file(key)
    answers: Dict[int, Optional[Tuple[str, ...]]] = {}
    for index, entry in enumerate(top_level(paths.read_json(key), "annotations", source)):
        question_id = entry.get("question_id") if isinstance(entry, dict) else None
        try:
            question_id = get_field(entry, "question_id", int)
            answers[question_id] = _answers(entry)
        except MalformedEntry as error:
            label = entry_label(entry, index, ("question_id", "image_id"))
            problems.malformed(split, source, label, str(error))
            if isinstance(question_id, int) and not isinstance(question_id, bool):
                answers[question_id] = None
    return answers


def _coco_vqa_split(paths: TaskPaths, prefix: str, split: str, problems: Problems) -> Examples:
    """``<prefix>_<train|val>_questions`` + ``_annotations`` files over COCO 2014 images."""
    part = "val" if split == "eval" else "train"
    question_key, annotation_key = f"{prefix}_{part}_questions", f"{prefix}_{part}_annotations"
    source = paths.file(question_key)
    questions = top_level(paths.read_json(question_key), "questions", source)
    answers = _read_annotations(paths, annotation_key, split, problems)
    answer_source = paths.file(annotation_key)
    folder_key, coco_split = COCO_IMAGES[split]
    folder = paths.folder(folder_key)
    examples = []
    for index, entry in enumerate(questions):
        try:
            question_id = get_field(entry, "question_id", int)
            image_id = get_field(entry, "image_id", int)
            question = get_field(entry, "question", str)
        except MalformedEntry as error:
            label = entry_label(entry, index, ("question_id", "image_id"))
            problems.malformed(split, source, label, str(error))
            continue
        if question_id not in answers:
            message = f"{source}: question {question_id} has no annotation in {answer_source}"
            problems.add(split, NO_ANNOTATION, message)
            continue
        references = answers[question_id]
        if references is not None:
            image = folder / f"COCO_{coco_split}_{image_id:012d}.jpg"
            examples.append(EvalExample(str(question_id), image, references, question))
    return problems.finish_split(examples, split, source, "question")


def read_vqav2(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """VQAv2 val questions + annotations for eval; the train2014 files for demos."""
    return _coco_vqa_split(paths, "vqav2", "eval", problems), _coco_vqa_split(
        paths, "vqav2", "demo", problems
    )


def read_okvqa(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """OK-VQA val questions + annotations (the ``answer`` fields, not ``raw_answer``) for
    eval; the train2014 files for demos. Same layout as VQAv2, over COCO 2014 images."""
    return _coco_vqa_split(paths, "okvqa", "eval", problems), _coco_vqa_split(
        paths, "okvqa", "demo", problems
    )


def _textvqa_split(paths: TaskPaths, key: str, split: str, problems: Problems) -> Examples:
    source, folder = paths.file(key), paths.folder("textvqa_train_images")
    examples = []
    for index, entry in enumerate(top_level(paths.read_json(key), "data", source)):
        try:
            question_id = get_field(entry, "question_id", int)
            image_id = get_field(entry, "image_id", str)
            question = get_field(entry, "question", str)
            answers = tuple(get_strings(entry, "answers"))
            if not answers:
                raise MalformedEntry("has an empty 'answers' list")
        except MalformedEntry as error:
            label = entry_label(entry, index, ("question_id", "image_id"))
            problems.malformed(split, source, label, str(error))
            continue
        image = folder / f"{image_id}.jpg"
        examples.append(EvalExample(str(question_id), image, answers, question))
    return problems.finish_split(examples, split, source, "question")


def read_textvqa(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """``TextVQA_0.5.1_val.json`` for eval, ``_train.json`` for demos; both splits' images
    are ``<image_id>.jpg`` in TextVQA's ``train_images`` folder."""
    eval_examples = _textvqa_split(paths, "textvqa_val_json", "eval", problems)
    return eval_examples, _textvqa_split(paths, "textvqa_train_json", "demo", problems)


def _vizwiz_split(paths: TaskPaths, part: str, split: str, problems: Problems) -> Examples:
    source = paths.file(f"vizwiz_{part}_json")
    folder: Path = paths.folder(f"vizwiz_{part}_images")
    examples = []
    for index, entry in enumerate(top_level(paths.read_json(f"vizwiz_{part}_json"), None, source)):
        try:
            image = get_field(entry, "image", str)
            question = get_field(entry, "question", str)
            answers = _answers(entry)
        except MalformedEntry as error:
            problems.malformed(split, source, entry_label(entry, index, ("image",)), str(error))
            continue
        examples.append(EvalExample(image, folder / image, answers, question))
    return problems.finish_split(examples, split, source, "image")


def read_vizwiz(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """VizWiz ``val.json`` for eval, ``train.json`` for demos (a list of ``image``,
    ``question``, ``answers``); ``unanswerable`` is an ordinary answer, and the example id is
    the image file name, VizWiz's only id (one question per image)."""
    eval_examples = _vizwiz_split(paths, "val", "eval", problems)
    return eval_examples, _vizwiz_split(paths, "train", "demo", problems)
