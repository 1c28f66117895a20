"""Where each task's official files are: a flat mapping of named paths, usually a YAML file.

Every key names one file or folder as distributed by the dataset's authors (see
``PATH_KEYS`` and ``docs/evaluation.md``). Relative paths in a YAML file are resolved
against the YAML file's folder; relative overrides against the working directory. A task
only needs its own keys, so a YAML file lists just the datasets one has downloaded.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from mm1_megatron.config.safe_yaml import parse_yaml

PATH_KEYS: Dict[str, str] = {
    "coco_train2014_images": "folder of COCO train2014 images (COCO_train2014_%012d.jpg)",
    "coco_val2014_images": "folder of COCO val2014 images (COCO_val2014_%012d.jpg)",
    "coco_karpathy_json": "Karpathy's dataset_coco.json (caption_datasets.zip)",
    "coco_captions_train2014": "captions_train2014.json (annotations_trainval2014.zip)",
    "coco_captions_val2014": "captions_val2014.json (annotations_trainval2014.zip)",
    "nocaps_val_json": "nocaps_val_4500_captions.json",
    "nocaps_val_images": "folder of the nocaps val images (Open Images validation), by file_name",
    "textcaps_train_json": "TextCaps_0.1_train.json",
    "textcaps_val_json": "TextCaps_0.1_val.json",
    "textvqa_train_images": "train_images/ of TextVQA's train_val_images.zip (<image_id>.jpg)",
    "textvqa_train_json": "TextVQA_0.5.1_train.json",
    "textvqa_val_json": "TextVQA_0.5.1_val.json",
    "vqav2_train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
    "vqav2_train_annotations": "v2_mscoco_train2014_annotations.json",
    "vqav2_val_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
    "vqav2_val_annotations": "v2_mscoco_val2014_annotations.json",
    "okvqa_train_questions": "OK-VQA OpenEnded_mscoco_train2014_questions.json",
    "okvqa_train_annotations": "OK-VQA mscoco_train2014_annotations.json",
    "okvqa_val_questions": "OK-VQA OpenEnded_mscoco_val2014_questions.json",
    "okvqa_val_annotations": "OK-VQA mscoco_val2014_annotations.json",
    "vizwiz_train_json": "VizWiz VQA Annotations/train.json",
    "vizwiz_val_json": "VizWiz VQA Annotations/val.json",
    "vizwiz_train_images": "folder of the VizWiz train images (train.zip)",
    "vizwiz_val_images": "folder of the VizWiz val images (val.zip)",
}


def _unknown_key_message(key: str, where: str) -> str:
    close = difflib.get_close_matches(key, PATH_KEYS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown task path key {key!r} in {where}{hint} Valid keys: {', '.join(PATH_KEYS)}"


def _as_paths(mapping: Mapping[str, Any], base: Path, where: str) -> Dict[str, Path]:
    paths = {}
    for key, value in mapping.items():
        if key not in PATH_KEYS:
            raise ValueError(_unknown_key_message(str(key), where))
        if not isinstance(value, (str, Path)) or not str(value):
            raise ValueError(f"{where}: {key!r} must be a path, got {value!r}")
        path = Path(value).expanduser()
        paths[key] = path if path.is_absolute() else base / path
    return paths


@dataclass(frozen=True)
class TaskPaths:
    """Named paths of official dataset files; ``source`` is the YAML file they came from."""

    paths: Mapping[str, Path] = field(default_factory=dict)
    source: Optional[Path] = None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], base: Optional[Path] = None) -> TaskPaths:
        """Paths from a mapping; relative ones are resolved against ``base`` (default: cwd)."""
        return cls(_as_paths(mapping, base or Path.cwd(), "the task paths"))

    def with_overrides(self, overrides: Mapping[str, Any]) -> TaskPaths:
        """A copy with ``overrides`` (key -> path, relative to cwd) replacing entries."""
        merged = dict(self.paths)
        merged.update(_as_paths(overrides, Path.cwd(), "the task path overrides"))
        return TaskPaths(merged, self.source)

    def _where(self) -> str:
        return f"the paths YAML {self.source}" if self.source else "the task paths"

    def _get(self, key: str) -> Path:
        if key not in PATH_KEYS:
            raise KeyError(key)  # a reader asks for a key that is not documented: a bug
        if key not in self.paths:
            raise ValueError(
                f"{self._where()} has no key {key!r} ({PATH_KEYS[key]}); add it to the "
                "YAML file or pass it as an override"
            )
        return self.paths[key]

    def file(self, key: str) -> Path:
        """The existing file under ``key``; a ValueError naming path and key otherwise."""
        path = self._get(key)
        if not path.is_file():
            raise ValueError(f"{path} (key {key!r} of {self._where()}) is not a file")
        return path

    def folder(self, key: str) -> Path:
        """The existing folder under ``key``; a ValueError naming path and key otherwise."""
        path = self._get(key)
        if not path.is_dir():
            raise ValueError(f"{path} (key {key!r} of {self._where()}) is not a folder")
        return path

    def read_json(self, key: str) -> Any:
        """The parsed JSON file under ``key``."""
        path = self.file(key)
        try:
            with path.open(encoding="utf-8") as stream:
                return json.load(stream)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} (key {key!r}) is not valid JSON: {error}") from error


def load_task_paths(
    path: Union[str, Path], overrides: Optional[Mapping[str, Any]] = None
) -> TaskPaths:
    """Read a paths YAML file (a flat mapping ``key: path``), then apply ``overrides``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"task paths YAML {path} does not exist")
    tree = parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"task paths YAML {path} must be a mapping of key: path")
    paths = TaskPaths(_as_paths(tree, path.parent.resolve(), f"the paths YAML {path}"), path)
    return paths.with_overrides(overrides) if overrides else paths
