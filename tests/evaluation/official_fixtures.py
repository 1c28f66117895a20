"""Tiny datasets in the evaluation tasks' official file formats, for tests.

``write_official_fixtures(root)`` writes, under ``root``, a few evaluation and a few
demonstration entries of every task that reads official files (the same JSON layouts as
the files distributed by COCO, Karpathy, nocaps, TextCaps, TextVQA, VQAv2, OK-VQA and
VizWiz), 32x32 JPEG images for them, and ``task_paths.yaml`` mapping every key the tasks
need to those files (relative paths). ``EXPECTED_EVAL_IDS`` / ``EXPECTED_DEMO_IDS`` list
the ids ``load_task`` should return, in order.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple

import yaml
from PIL import Image, ImageDraw

OFFICIAL_TASKS: Tuple[str, ...] = (
    "coco_karpathy",
    "coco_val2014",
    "nocaps",
    "textcaps",
    "vqav2",
    "textvqa",
    "vizwiz",
    "okvqa",
)
EXPECTED_EVAL_IDS: Dict[str, Tuple[str, ...]] = {
    "coco_karpathy": ("42", "73"),
    "coco_val2014": ("42", "73", "74"),
    "nocaps": ("0", "1"),
    "textcaps": ("0a1b2c3d4e5f6071", "1b2c3d4e5f607182"),
    "vqav2": ("42000", "42001", "73000"),
    "textvqa": ("34602", "34603", "34604"),
    "vizwiz": ("VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"),
    "okvqa": ("4201", "7301"),
}
KARPATHY_DEMO_IDS = ("9", "25", "133")  # train 9, 25 and restval 133; 74 is Karpathy val
EXPECTED_DEMO_IDS: Dict[str, Tuple[str, ...]] = {
    "coco_karpathy": KARPATHY_DEMO_IDS,
    "coco_val2014": ("9", "25", "30"),
    "nocaps": KARPATHY_DEMO_IDS,
    "textcaps": ("2c3d4e5f60718293",),
    "vqav2": ("9000", "25000"),
    "textvqa": ("1", "2"),
    "vizwiz": ("VizWiz_train_00000000.jpg", "VizWiz_train_00000001.jpg"),
    "okvqa": ("2501",),
}
# image id -> the Karpathy split; all val2014 ids except 9, 25 (train2014)
KARPATHY_SPLITS = {42: "test", 73: "test", 74: "val", 133: "restval", 9: "train", 25: "train"}
TRAIN2014_IDS = (9, 25, 30)


def captions_of(image: Any, count: int = 2) -> List[str]:
    """The fixture's reference captions of ``image`` (deterministic)."""
    return [f"photo {image} caption {k}" for k in range(count)]


def answers_of(question_id: Any, count: int = 10) -> List[str]:
    """The fixture's raw annotator answers of a question: 7 agree, the rest differ."""
    return [f"answer {question_id}" if k < 7 else f"other {k}" for k in range(count)]


def coco_file(image_id: int) -> Tuple[str, str]:
    """``(folder, file_name)`` of a COCO 2014 image in the fixtures."""
    split = "train2014" if image_id in TRAIN2014_IDS else "val2014"
    return split, f"COCO_{split}_{image_id:012d}.jpg"


def write_image(path: Path, size: int = 32) -> None:
    """A small JPEG whose colours are a function of its file name."""
    seed = zlib.crc32(path.name.encode())
    colour = (seed & 255, (seed >> 8) & 255, (seed >> 16) & 255)
    image = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, size // 2, size // 2], fill="white")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG")


def _dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _coco_images(root: Path, ids: Iterable[int]) -> None:
    for image_id in ids:
        write_image(root.joinpath("coco", *coco_file(image_id)))


def _coco_image_entry(image_id: int, file_name: str) -> Dict[str, Any]:
    return {"license": 1, "file_name": file_name, "height": 32, "width": 32, "id": image_id}


def _captions_json(entries: List[Tuple[int, str]]) -> Dict[str, Any]:
    """A COCO captions file: ``(image_id, file_name)`` entries, 2 captions each."""
    annotations = [
        {"image_id": image_id, "id": image_id * 10 + k, "caption": caption}
        for image_id, _ in entries
        for k, caption in enumerate(captions_of(image_id))
    ]
    images = [_coco_image_entry(image_id, name) for image_id, name in entries]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations}


def write_coco_karpathy(root: Path) -> Dict[str, str]:
    images = []
    for image_id, split in KARPATHY_SPLITS.items():
        filepath, filename = coco_file(image_id)
        sentences = [
            {"tokens": raw.split(), "raw": raw, "imgid": image_id, "sentid": image_id * 10 + k}
            for k, raw in enumerate(captions_of(image_id))
        ]
        images.append(
            {
                "filepath": filepath,
                "sentids": [s["sentid"] for s in sentences],
                "filename": filename,
                "imgid": image_id,
                "split": split,
                "sentences": sentences,
                "cocoid": image_id,
            }
        )
    _dump(root / "coco/karpathy/dataset_coco.json", {"images": images, "dataset": "coco"})
    _coco_images(root, KARPATHY_SPLITS)
    return {"coco_karpathy_json": "coco/karpathy/dataset_coco.json", **_coco_folders()}


def _coco_folders() -> Dict[str, str]:
    return {"coco_train2014_images": "coco/train2014", "coco_val2014_images": "coco/val2014"}


def write_coco_val2014(root: Path) -> Dict[str, str]:
    keys = {}
    for key, ids in (("val2014", (42, 73, 74)), ("train2014", TRAIN2014_IDS)):
        data = _captions_json([(i, coco_file(i)[1]) for i in ids])
        _dump(root / f"coco/annotations/captions_{key}.json", data)
        keys[f"coco_captions_{key}"] = f"coco/annotations/captions_{key}.json"
        _coco_images(root, ids)
    return {**keys, **_coco_folders()}


def write_nocaps(root: Path) -> Dict[str, str]:
    entries = [(0, "0013ea2087020901.jpg"), (1, "0023fdcfb9a1c6e8.jpg")]
    data = _captions_json(entries)
    for image, (_, name) in zip(data["images"], entries):
        image.update(open_images_id=name[:-4], domain="in-domain", coco_url=f"https://x/{name}")
        write_image(root / "nocaps/validation" / name)
    _dump(root / "nocaps/nocaps_val_4500_captions.json", data)
    keys = {"nocaps_val_json": "nocaps/nocaps_val_4500_captions.json"}
    return {**keys, "nocaps_val_images": "nocaps/validation", **write_coco_karpathy(root)}


def _textcaps_json(split: str, image_ids: Iterable[str]) -> Dict[str, Any]:
    data = []
    for image_id in image_ids:
        references = captions_of(image_id, 3)
        ids = {"image_id": image_id, "image_name": image_id}
        for caption in references:
            data.append(
                {
                    **ids,
                    "image_path": f"train/{image_id}.jpg",
                    "set_name": split,
                    "image_classes": ["Sign"],
                    "image_width": 32,
                    "image_height": 32,
                    "caption_id": len(data),
                    "caption_str": caption,
                    "caption_tokens": caption.split(),
                    "reference_strs": references,
                    "reference_tokens": [r.split() for r in references],
                }
            )
    return {
        "dataset_type": split,
        "dataset_name": "textcaps",
        "dataset_version": "0.1",
        "data": data,
    }


def write_textcaps(root: Path) -> Dict[str, str]:
    for split, ids in (
        ("val", EXPECTED_EVAL_IDS["textcaps"]),
        ("train", EXPECTED_DEMO_IDS["textcaps"]),
    ):
        _dump(root / f"textcaps/TextCaps_0.1_{split}.json", _textcaps_json(split, ids))
        for image_id in ids:
            write_image(root / f"textvqa/train_images/{image_id}.jpg")
    return {
        "textcaps_val_json": "textcaps/TextCaps_0.1_val.json",
        "textcaps_train_json": "textcaps/TextCaps_0.1_train.json",
        "textvqa_train_images": "textvqa/train_images",
    }


def _textvqa_json(split: str, questions: List[Tuple[int, str]]) -> Dict[str, Any]:
    data = [
        {
            "question": f"what is written on {image_id}?",
            "image_id": image_id,
            "image_classes": ["Sign"],
            "image_width": 32,
            "image_height": 32,
            "answers": answers_of(question_id),
            "question_tokens": ["what"],
            "question_id": question_id,
            "set_name": split,
            "image_name": image_id,
            "image_path": f"train/{image_id}.jpg",
        }
        for question_id, image_id in questions
    ]
    return {
        "dataset_type": split,
        "dataset_name": "textvqa",
        "dataset_version": "0.5.1",
        "data": data,
    }


def write_textvqa(root: Path) -> Dict[str, str]:
    splits = {
        "val": [
            (34602, "a1b2c3d4e5f60718"),
            (34603, "a1b2c3d4e5f60718"),
            (34604, "b2c3d4e5f6071829"),
        ],
        "train": [(1, "c3d4e5f607182930"), (2, "d4e5f60718293041")],
    }
    for split, questions in splits.items():
        _dump(root / f"textvqa/TextVQA_0.5.1_{split}.json", _textvqa_json(split, questions))
        for _, image_id in questions:
            write_image(root / f"textvqa/train_images/{image_id}.jpg")
    return {
        "textvqa_val_json": "textvqa/TextVQA_0.5.1_val.json",
        "textvqa_train_json": "textvqa/TextVQA_0.5.1_train.json",
        "textvqa_train_images": "textvqa/train_images",
    }


def _vqa_files(questions: List[Tuple[int, int]], subtype: str, okvqa: bool) -> Tuple[Dict, Dict]:
    """VQAv2 / OK-VQA questions and annotations files for ``(question_id, image_id)``s."""
    question_entries, annotations = [], []
    for question_id, image_id in questions:
        question = f"what is in picture {image_id}?"
        question_entries.append(
            {"image_id": image_id, "question": question, "question_id": question_id}
        )
        answers = [
            {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
            for k, answer in enumerate(answers_of(question_id))
        ]
        for answer in answers if okvqa else ():
            answer["raw_answer"] = answer["answer"] + "s"
        annotations.append(
            {
                "question_type": "what is",
                "multiple_choice_answer": f"answer {question_id}",
                "answers": answers,
                "image_id": image_id,
                "answer_type": "other",
                "question_id": question_id,
            }
        )
    header = {"info": {}, "license": {}, "data_subtype": subtype, "data_type": "mscoco"}
    return (
        {**header, "task_type": "Open-Ended", "questions": question_entries},
        {**header, "annotations": annotations},
    )


def _write_coco_vqa(
    root: Path, prefix: str, names: Dict[str, Tuple[str, str]], splits
) -> Dict[str, str]:
    keys = _coco_folders()
    for part, questions in splits.items():
        subtype = "val2014" if part == "val" else "train2014"
        question_data, annotation_data = _vqa_files(questions, subtype, prefix == "okvqa")
        question_name, annotation_name = names[part]
        _dump(root / prefix / question_name, question_data)
        _dump(root / prefix / annotation_name, annotation_data)
        keys[f"{prefix}_{part}_questions"] = f"{prefix}/{question_name}"
        keys[f"{prefix}_{part}_annotations"] = f"{prefix}/{annotation_name}"
        _coco_images(root, {image_id for _, image_id in questions})
    return keys


def write_vqav2(root: Path) -> Dict[str, str]:
    names = {
        part: (
            f"v2_OpenEnded_mscoco_{part}2014_questions.json",
            f"v2_mscoco_{part}2014_annotations.json",
        )
        for part in ("train", "val")
    }
    splits = {"val": [(42000, 42), (42001, 42), (73000, 73)], "train": [(9000, 9), (25000, 25)]}
    return _write_coco_vqa(root, "vqav2", names, splits)


def write_okvqa(root: Path) -> Dict[str, str]:
    names = {
        part: (f"OpenEnded_mscoco_{part}2014_questions.json", f"mscoco_{part}2014_annotations.json")
        for part in ("train", "val")
    }
    splits = {"val": [(4201, 42), (7301, 73)], "train": [(2501, 25)]}
    return _write_coco_vqa(root, "okvqa", names, splits)


def write_vizwiz(root: Path) -> Dict[str, str]:
    keys = {}
    for part, eval_split in (("val", "eval"), ("train", "demo")):
        ids = (EXPECTED_EVAL_IDS if eval_split == "eval" else EXPECTED_DEMO_IDS)["vizwiz"]
        entries = []
        for k, image in enumerate(ids):
            answers = ["unanswerable"] * 10 if k == 1 else answers_of(image)
            entries.append(
                {
                    "image": image,
                    "question": f"what is this {k}?",
                    "answerable": int(k != 1),
                    "answer_type": "unanswerable" if k == 1 else "other",
                    "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers],
                }
            )
            write_image(root / f"vizwiz/{part}/{image}")
        _dump(root / f"vizwiz/Annotations/{part}.json", entries)
        keys[f"vizwiz_{part}_json"] = f"vizwiz/Annotations/{part}.json"
        keys[f"vizwiz_{part}_images"] = f"vizwiz/{part}"
    return keys


WRITERS: Dict[str, Callable[[Path], Dict[str, str]]] = {
    "coco_karpathy": write_coco_karpathy,
    "coco_val2014": write_coco_val2014,
    "nocaps": write_nocaps,
    "textcaps": write_textcaps,
    "vqav2": write_vqav2,
    "textvqa": write_textvqa,
    "vizwiz": write_vizwiz,
    "okvqa": write_okvqa,
}


def write_official_fixtures(root: Path, tasks: Iterable[str] = OFFICIAL_TASKS) -> Path:
    """Write the fixture files of ``tasks`` under ``root``; return the paths YAML file.

    The YAML file (``root/task_paths.yaml``) holds relative paths, resolved against its
    folder, for exactly the keys the chosen tasks need.
    """
    root = Path(root)
    keys: Dict[str, str] = {}
    for task in tasks:
        if task not in WRITERS:
            raise ValueError(f"no official fixture for task {task!r}; have {OFFICIAL_TASKS}")
        keys.update(WRITERS[task](root))
    path = root / "task_paths.yaml"
    path.write_text(yaml.safe_dump(dict(sorted(keys.items()))))
    return path
