"""Megatron-Energon datasets as sources of our mixture (read without energon installed).

An energon dataset is a folder of WebDataset tars plus ``.nv-meta/``: ``.info.json`` (or
the older ``.info.yaml``) with each shard's sample count, ``split.yaml`` (or
``split.json``) naming the shards of each split part (brace patterns such as
``data-{000..099}.tar``) and what to exclude, and ``dataset.yaml`` saying how a sample's
parts become a typed sample. We read the ``train`` part's shards with our own shard
reader (so resuming stays exact across data-parallel sizes) and turn each sample into
our records:

========================  =================  ===========================================
energon sample type       our source         becomes
========================  =================  ===========================================
``CaptioningSample``      ``caption``        ``image`` then ``caption``
``InterleavedSample``     ``interleaved``    ``sequence`` in order (images and texts)
``VQASample``             ``conversation``   user: ``<image>`` + newline + ``context``;
                                             assistant: the answer with the largest
                                             ``answer_weights`` (else the first)
``CrudeWebdataset``       any                the parts read as our own shard records
                                             (``records.py``: ``json`` segments, a
                                             ``txt`` + image pair, or a LLaVA record)
========================  =================  ===========================================

Fields come from ``field_map`` (``part``, ``part[key][0]`` into a JSON part, ``a,b`` for
the first that exists) or from the dataset's ``sample_loader`` (Python in ``.nv-meta``,
run as energon runs it, on parts decoded the way energon decodes them except images,
which it receives as opaque handles it must pass through unchanged: we read and decode
images later, in batches). Dataset code runs only with ``data.allow_dataset_code`` and
only from inside the dataset's ``.nv-meta`` (``dataset_code.py``). Whatever a sample
holds, reading it raises ``BadSample`` and nothing else. Metadatasets (blend YAMLs) are
not read: list their datasets in ``data.shards`` and weigh them with ``data.mixture``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from mm1_megatron.config.safe_yaml import parse_yaml
from mm1_megatron.data.shards.dataset_code import NV_META, load_dataset_function
from mm1_megatron.data.shards.reader import Manifest, load_manifest, manifest_file
from mm1_megatron.data.shards.records import (
    ImageRef,
    ReadMember,
    RecordFormat,
    Segment,
    decode_text,
    is_image_extension,
    load_json,
)
from mm1_megatron.data.shards.skips import BadSample

logger = logging.getLogger(__name__)

CRUDE = "CrudeWebdataset"
KIND_SUBFLAVOR = "mm1_megatron_kind"  # names our kind in the .nv-meta mm1 data writes
SAMPLE_TYPE_KINDS = {
    "CaptioningSample": "caption",
    "InterleavedSample": "interleaved",
    "VQASample": "conversation",
}
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_FIELD_ACCESS = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]+\])*)$")


@dataclass(frozen=True)
class ImagePart:
    """An image part handed to a field map or sample loader (read later, by extension)."""

    extension: str


@dataclass
class DatasetSpec:
    """What ``dataset.yaml`` says."""

    sample_type: str
    field_map: Optional[Dict[str, str]] = None
    sample_loader: Optional[Callable[[dict], dict]] = None
    part_filter: Optional[Callable[[str], bool]] = None
    subflavors: Dict[str, object] = field(default_factory=dict)

    @property
    def kind(self) -> Optional[str]:
        return SAMPLE_TYPE_KINDS.get(self.sample_type)


def is_energon_dataset(path: Union[str, Path]) -> bool:
    meta = Path(path) / NV_META
    return (meta / ".info.json").is_file() or (meta / ".info.yaml").is_file()


def expand_braces(pattern: str) -> List[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar a-01.tar a-02.tar`` (padding kept); ``{x,y}`` too."""
    open_at = pattern.find("{")
    if open_at < 0:
        return [pattern]
    close_at = pattern.find("}", open_at)
    if close_at < 0:
        raise ValueError(f"unbalanced brace in shard pattern {pattern!r}")
    body, head, tail = pattern[open_at : close_at + 1], pattern[:open_at], pattern[close_at + 1 :]
    match = _BRACE_RANGE.fullmatch(body)
    if match:
        first, last = match.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    else:
        options = body[1:-1].split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _read_meta(folder: Path, stem: str, suffixes: Tuple[str, ...] = (".json", ".yaml")) -> object:
    """``<stem>.json`` or ``<stem>.yaml`` from ``.nv-meta``, the first that exists."""
    for suffix in suffixes:
        file = folder / NV_META / f"{stem}{suffix}"
        if file.is_file():
            try:
                text = file.read_text(encoding="utf-8")
                # A dataset someone else made: YAML alias expansion bounded, as for configs.
                return json.loads(text) if suffix == ".json" else parse_yaml(text, str(file))
            except (OSError, ValueError, RecursionError) as exc:
                raise ValueError(f"cannot read energon metadata {file}: {exc}") from exc
    raise ValueError(
        f"{folder / NV_META} has no {stem}.json or {stem}.yaml; prepare the dataset with "
        f"`energon prepare {folder}`"
    )


def read_dataset_spec(folder: Path, allow_dataset_code: bool = False) -> DatasetSpec:
    raw = _read_meta(folder, "dataset", (".yaml", ".json"))
    if not isinstance(raw, dict):
        raise ValueError(f"{folder / NV_META}/dataset.yaml is not a mapping")
    if "sample_type" in raw:
        sample_type = str(raw["sample_type"].get("__class__", ""))
    else:  # older files name a dataset class, e.g. CaptioningWebdataset
        sample_type = str(raw.get("__class__", "")).replace("Webdataset", "Sample")
        sample_type = CRUDE if sample_type == "CrudeSample" else sample_type
    if sample_type != CRUDE and sample_type not in SAMPLE_TYPE_KINDS:
        raise ValueError(
            f"{folder}: energon sample type {sample_type!r} is not read here; supported: "
            f"{sorted(SAMPLE_TYPE_KINDS) + [CRUDE]} (docs/data.md, Megatron-Energon datasets)"
        )
    spec = DatasetSpec(sample_type=sample_type, subflavors=dict(raw.get("subflavors") or {}))
    if sample_type == CRUDE:
        return spec
    if raw.get("field_map"):
        spec.field_map = {str(k): str(v) for k, v in raw["field_map"].items()}
    elif raw.get("sample_loader"):
        spec.sample_loader = load_dataset_function(
            folder, str(raw["sample_loader"]), "sample_loader", allow_dataset_code
        )
        if raw.get("part_filter"):
            spec.part_filter = _part_filter(folder, raw["part_filter"], allow_dataset_code)
    else:
        raise ValueError(f"{folder}: dataset.yaml has neither field_map nor sample_loader")
    return spec


def _part_filter(folder: Path, value: object, allowed: bool) -> Callable[[str], bool]:
    if isinstance(value, list):
        parts = set(map(str, value))
        return lambda part: part in parts
    return load_dataset_function(folder, str(value), "part_filter", allowed)


def load_energon_manifest(
    folder: Union[str, Path],
    kind: str,
    split_part: str = "train",
    *,
    allow_dataset_code: bool = False,
) -> Manifest:
    """The ``split_part`` shards of an energon dataset as a manifest for ``kind``;
    ``allow_dataset_code``: its ``sample_loader`` may run (``dataset_code.py``)."""
    folder = Path(folder).resolve()
    info = _read_meta(folder, ".info")
    counts = info.get("shard_counts") if isinstance(info, dict) else None
    if not isinstance(counts, dict):
        raise ValueError(f"{folder / NV_META}/.info.json has no shard_counts")
    splits = _read_meta(folder, "split", (".yaml", ".json"))
    parts = (splits or {}).get("split_parts", {})
    if split_part not in parts:
        raise ValueError(f"{folder}: split.yaml has no {split_part!r} part (has {sorted(parts)})")
    excluded = {name for item in splits.get("exclude") or [] for name in expand_braces(item)}
    names = [n for pattern in parts[split_part] for n in expand_braces(pattern)]
    names = [name for name in names if name not in excluded]
    unknown = [name for name in names if name not in counts]
    if unknown:
        raise ValueError(f"{folder}: split shards {unknown[:3]} are not in .info.json")
    spec = read_dataset_spec(folder, allow_dataset_code)
    if spec.kind is not None and spec.kind != kind:
        raise ValueError(
            f"{folder} holds energon {spec.sample_type}s, read as {spec.kind!r} data; "
            f"it is configured as a {kind!r} source (data.shards.{kind})"
        )
    written_as = spec.subflavors.get(KIND_SUBFLAVOR) if spec.sample_type == CRUDE else None
    if written_as is not None and written_as != kind:
        raise ValueError(
            f"{folder} holds {written_as!r} shards written by mm1 data (its .nv-meta says "
            f"{KIND_SUBFLAVOR}: {written_as}); it is configured as a {kind!r} source "
            f"(data.shards.{kind}): list it under data.shards.{written_as}"
        )
    paths = [str(folder / name) for name in names]
    return Manifest(
        kind=kind,
        shard_paths=paths,
        shard_sizes=[int(counts[name]) for name in names],
        path=str(folder),
        records=EnergonRecords(spec) if spec.sample_type != CRUDE else RecordFormat(),
        excluded=frozenset(_excluded_samples(folder, excluded)),
    )


def _excluded_samples(folder: Path, excluded: set) -> List[Tuple[str, int]]:
    samples = []
    for item in excluded:
        shard, slash, number = item.rpartition("/")
        if slash and number.isdigit() and shard.endswith(".tar"):
            samples.append((str(folder / shard), int(number)))
    return samples


class EnergonRecords(RecordFormat):
    """Samples of a typed energon dataset (module docstring) as our records."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.name = f"energon {spec.sample_type}"
        # The parts a field map reads, found once rather than per sample.
        self.needed_parts = {
            _access_path(option)[0]
            for access in (spec.field_map or {}).values()
            for option in access.split(",")
        }

    def _segments(self, members: Dict[str, int], read: ReadMember) -> List[Segment]:
        fields = self._fields(members, read)
        if self.spec.sample_type == "CaptioningSample":
            return [self._image(fields, "image", members), self._text(fields, "caption")]
        sequence = fields.get("sequence")
        if not isinstance(sequence, list) or not sequence:
            raise BadSample("bad_record", "InterleavedSample needs a non-empty sequence list")
        return [
            self._image({"item": item}, "item", members)
            if isinstance(item, ImagePart)
            else self._text({"item": item}, "item")
            for item in sequence
        ]

    def _conversation(self, members: Dict[str, int], read: ReadMember) -> Dict[str, object]:
        fields = self._fields(members, read)
        image = self._image(fields, "image", members)
        context = self._text(fields, "context")
        answer = _best_answer(fields.get("answers"), fields.get("answer_weights"))
        return {
            "conversations": [
                {"from": "human", "value": f"<image>\n{context}"},
                {"from": "gpt", "value": answer},
            ],
            "image": [image.extension],
        }

    def _fields(self, members: Dict[str, int], read: ReadMember) -> Dict[str, object]:
        if self.spec.field_map is not None:
            needed = self.needed_parts
            parts = {ext: _decoded_part(ext, read) for ext in members if ext in needed}
            return {name: _field(parts, access) for name, access in self.spec.field_map.items()}
        keep = self.spec.part_filter or (lambda part: True)
        raw = {ext: _decoded_part(ext, read) for ext in members if keep(ext)}
        try:
            return dict(self.spec.sample_loader({"__key__": "", **raw}))
        except Exception as exc:  # the dataset's own code: any error skips the sample
            raise BadSample("bad_record", f"sample_loader failed: {exc!r}") from exc

    @staticmethod
    def _image(fields: Dict[str, object], name: str, members: Dict[str, int]) -> ImageRef:
        value = fields.get(name)
        if not isinstance(value, ImagePart):
            raise BadSample("missing_image", f"field {name!r} is not an image part: {value!r}")
        if members.get(value.extension, 0) == 0:
            raise BadSample("empty_file", f"zero-byte image {value.extension!r}")
        return ImageRef(value.extension)

    @staticmethod
    def _text(fields: Dict[str, object], name: str) -> str:
        value = fields.get(name)
        if not isinstance(value, str):
            raise BadSample("bad_record", f"field {name!r} is not text: {value!r}")
        return value


def _decoded_part(extension: str, read: ReadMember) -> object:
    """A part as energon's default decoder gives it, images left as ``ImagePart``."""
    last = extension.rsplit(".", 1)[-1]
    if is_image_extension(extension):
        return ImagePart(extension)
    if last == "json":
        return load_json(read(extension), f"part {extension!r}")
    text = decode_text(read(extension))
    if last in ("cls", "index", "inx", "id"):
        try:
            return int(text.strip())
        except ValueError as exc:
            raise BadSample("bad_text", f"part {extension!r} is not an integer") from exc
    return text


def _access_path(option: str) -> List[str]:
    """``json[a][0]`` -> ``['json', 'a', '0']``."""
    match = _FIELD_ACCESS.match(option.strip())
    if match is None:
        return [option.strip()]
    keys = match.group(2)[1:-1].split("][") if match.group(2) else []
    return [match.group(1), *keys]


def _field(parts: Dict[str, object], access: str) -> object:
    """The first of ``access``'s comma-separated options that exists (as energon does)."""
    for option in access.split(","):
        value: object = parts
        try:
            for key in _access_path(option):
                value = value[int(key)] if isinstance(value, list) else value[key]
            return value
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    raise BadSample("bad_record", f"field_map {access!r} finds nothing among {sorted(parts)}")


def _best_answer(answers: object, weights: object) -> str:
    if isinstance(answers, str):
        return answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise BadSample("bad_record", f"VQASample answers {answers!r} are not a list of text")
    if isinstance(weights, list) and len(weights) == len(answers):
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
            raise BadSample("bad_record", f"VQASample answer_weights {weights!r} are not numbers")
        return answers[max(range(len(answers)), key=lambda i: (float(weights[i]), -i))]
    return answers[0]


def load_source_manifest(
    path: Union[str, Path], kind: str, *, allow_dataset_code: bool = False
) -> Manifest:
    """A ``data.shards.<kind>`` entry: our manifest (or a folder holding one), else an
    energon dataset folder, optionally ``folder#part`` for a split part (``train`` when
    not given; held-out evaluation usually reads ``#val``). ``allow_dataset_code``:
    ``data.allow_dataset_code`` (an energon dataset's ``sample_loader`` may run)."""
    folder, _, split_part = str(path).partition("#")
    if Path(folder).is_dir() and not manifest_file(folder).is_file():
        if is_energon_dataset(folder):
            return load_energon_manifest(
                folder, kind, split_part or "train", allow_dataset_code=allow_dataset_code
            )
    if split_part:
        raise ValueError(f"{path}: '#{split_part}' selects a part of an energon dataset only")
    return load_manifest(path, kind=kind)
