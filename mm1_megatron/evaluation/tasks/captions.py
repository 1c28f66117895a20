"""Readers of the captioning tasks' official files: COCO (Karpathy and 2014), nocaps, TextCaps.

Each reader returns ``(eval_examples, demo_examples)``; one example per image, whose
references are all of that image's captions. Bad entries go to the ``Problems`` collector.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from mm1_megatron.evaluation.tasks.paths import TaskPaths
from mm1_megatron.evaluation.tasks.problems import (
    NO_REFERENCES,
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
KARPATHY_EVAL_SPLITS = ("test",)
KARPATHY_DEMO_SPLITS = ("train", "restval")


def _karpathy_example(entry: Any, folders: Dict[str, Path]) -> EvalExample:
    get_field(entry, "split", str)  # a wanted split, or malformed: see _karpathy_role
    filepath = get_field(entry, "filepath", str)
    if filepath not in folders:
        raise MalformedEntry(f"has filepath {filepath!r}, not one of {sorted(folders)}")
    image = folders[filepath] / get_field(entry, "filename", str)
    cocoid = get_field(entry, "cocoid", int)
    references = tuple(item_fields(entry, "sentences", "raw"))
    return EvalExample(str(cocoid), image, references)


def _karpathy_role(split: Any, need_eval: bool) -> Optional[str]:
    """``eval``/``demo`` for a wanted split; None for the others (Karpathy val, ...)."""
    if not isinstance(split, str):
        return "eval" if need_eval else "demo"  # malformed: reported under this role
    if split in KARPATHY_DEMO_SPLITS:
        return "demo"
    return "eval" if need_eval and split in KARPATHY_EVAL_SPLITS else None


def read_karpathy(
    paths: TaskPaths, problems: Problems, *, need_eval: bool = True
) -> Tuple[Examples, Examples]:
    """Karpathy's ``dataset_coco.json``: eval = split ``test``; demos = ``train`` + ``restval``.

    Images are ``<filepath>/<filename>`` with ``filepath`` one of ``train2014``/``val2014``,
    the folders under the keys ``coco_train2014_images`` and ``coco_val2014_images``.
    """
    source = paths.file("coco_karpathy_json")
    entries = top_level(paths.read_json("coco_karpathy_json"), "images", source)
    folders = {
        "train2014": paths.folder("coco_train2014_images"),
        "val2014": paths.folder("coco_val2014_images"),
    }
    found: Dict[str, Examples] = {"eval": [], "demo": []}
    for index, entry in enumerate(entries):
        role = _karpathy_role(entry.get("split") if isinstance(entry, dict) else None, need_eval)
        if role is None:
            continue
        try:
            found[role].append(_karpathy_example(entry, folders))
        except MalformedEntry as error:
            label = entry_label(entry, index, ("cocoid", "imgid", "filename"))
            problems.malformed(role, source, label, str(error))
    return (
        _finish_captions(found["eval"], "eval", source, problems),
        _finish_captions(found["demo"], "demo", source, problems),
    )


def _finish_captions(examples: Examples, split: str, source: Path, problems: Problems) -> Examples:
    """Drops (and reports) images without captions, duplicates and missing image files."""
    captioned = []
    for example in examples:
        if example.references:
            captioned.append(example)
        else:
            message = f"{source}: image {example.example_id!r} has no captions"
            problems.add(split, NO_REFERENCES, message)
    return problems.finish_split(captioned, split, source, "image id")


def read_coco_format(
    data: Any, source: Path, folder: Path, split: str, problems: Problems
) -> Examples:
    """A COCO captions file (``images`` with ``id``/``file_name``, ``annotations`` with
    ``image_id``/``caption``), as COCO 2014 and nocaps distribute them."""
    images = top_level(data, "images", source)
    captions: Dict[int, List[str]] = defaultdict(list)
    for index, entry in enumerate(top_level(data, "annotations", source)):
        try:
            image_id = get_field(entry, "image_id", int)
            captions[image_id].append(get_field(entry, "caption", str))
        except MalformedEntry as error:
            label = entry_label(entry, index, ("id", "image_id"))
            problems.malformed(split, source, f"annotation {label}", str(error))
    examples = []
    for index, entry in enumerate(images):
        try:
            image_id = get_field(entry, "id", int)
            image = folder / get_field(entry, "file_name", str)
        except MalformedEntry as error:
            label = entry_label(entry, index, ("id", "file_name"))
            problems.malformed(split, source, f"image {label}", str(error))
            continue
        examples.append(EvalExample(str(image_id), image, tuple(captions.get(image_id, ()))))
    return _finish_captions(examples, split, source, problems)


def read_coco_val2014(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """``captions_val2014.json`` for eval; ``captions_train2014.json`` for demos."""
    found = []
    for split, key, folder in (
        ("eval", "coco_captions_val2014", "coco_val2014_images"),
        ("demo", "coco_captions_train2014", "coco_train2014_images"),
    ):
        data = paths.read_json(key)
        found.append(read_coco_format(data, paths.file(key), paths.folder(folder), split, problems))
    return found[0], found[1]


def read_nocaps(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """``nocaps_val_4500_captions.json`` for eval. nocaps has no train split (its training
    data is COCO), so demos are COCO Karpathy train + restval, as OpenFlamingo-style
    few-shot evaluations do."""
    data = paths.read_json("nocaps_val_json")
    source, folder = paths.file("nocaps_val_json"), paths.folder("nocaps_val_images")
    eval_examples = read_coco_format(data, source, folder, "eval", problems)
    _, demos = read_karpathy(paths, problems, need_eval=False)
    return eval_examples, demos


def _textcaps_split(paths: TaskPaths, key: str, split: str, problems: Problems) -> Examples:
    source, folder = paths.file(key), paths.folder("textvqa_train_images")
    references: Dict[str, List[str]] = {}
    for index, entry in enumerate(top_level(paths.read_json(key), "data", source)):
        try:
            image_id = get_field(entry, "image_id", str)
            caption = get_field(entry, "caption_str", str)
            refs = references.setdefault(image_id, list(get_strings(entry, "reference_strs")))
        except MalformedEntry as error:
            label = entry_label(entry, index, ("image_id", "caption_id"))
            problems.malformed(split, source, label, str(error))
            continue
        if caption not in refs:
            refs.append(caption)
    examples = [
        EvalExample(image_id, folder / f"{image_id}.jpg", tuple(refs))
        for image_id, refs in references.items()
    ]
    return _finish_captions(examples, split, source, problems)


def read_textcaps(paths: TaskPaths, problems: Problems) -> Tuple[Examples, Examples]:
    """``TextCaps_0.1_val.json`` for eval, ``_train.json`` for demos: one example per image
    (the files hold one entry per caption); images are ``<image_id>.jpg`` in TextVQA's
    ``train_images`` folder, which holds both the train and the val images."""
    eval_examples = _textcaps_split(paths, "textcaps_val_json", "eval", problems)
    demos = _textcaps_split(paths, "textcaps_train_json", "demo", problems)
    return eval_examples, demos
