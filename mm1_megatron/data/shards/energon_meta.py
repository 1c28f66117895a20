"""Write Megatron-Energon's ``.nv-meta`` sidecar for shards our tools built.

Next to ``manifest.json`` the folder gets what ``energon prepare`` would write and energon's
loader needs (``energon lint`` and key lookups also want ``index.sqlite``, which
``energon prepare --tar-index-only`` adds):

- ``<shard>.tar.idx`` per shard: little-endian uint64 byte offsets of each sample's first
  tar header, then of the end of the last sample;
- ``.nv-meta/.info.json``: samples per shard; ``split.yaml``: every shard in ``train``;
- ``.nv-meta/dataset.yaml``: caption shards written by our tools (an image member ``0.<ext>``
  then one text segment) as ``CaptioningSample`` through a ``field_map``; every other
  layout as ``CrudeWebdataset`` with subflavor ``mm1_megatron_kind`` naming our kind, whose
  parts are our records (``records.py``), for a cooker of your own or for our loader.

Shards must lie inside the manifest's folder (energon names them relative to it).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple, Union

import yaml

from mm1_megatron.data.shards.energon import KIND_SUBFLAVOR, NV_META
from mm1_megatron.data.shards.reader import load_manifest, manifest_file, split_member_name
from mm1_megatron.data.shards.records import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

CAPTION_IMAGE_PARTS = ",".join(f"0.{extension}" for extension in IMAGE_EXTENSIONS)
CAPTION_FIELD_MAP = {"image": CAPTION_IMAGE_PARTS, "caption": "json[segments][1][text]"}


def sample_offsets(tar_path: Union[str, Path]) -> Tuple[List[int], List[List[str]]]:
    """Header offsets of each sample's first member plus the end offset, and each sample's
    part names, as energon indexes a tar (regular files only, grouped by key)."""
    offsets: List[int] = []
    parts: List[List[str]] = []
    last_key = None
    with tarfile.open(tar_path, mode="r:") as archive:
        for info in archive:
            if not info.isfile():
                continue
            key, extension = split_member_name(info.name)
            if key != last_key:
                offsets.append(info.offset)
                parts.append([])
                last_key = key
            parts[-1].append(extension)
        offsets.append(archive.offset)
    return offsets, parts


def write_energon_meta(manifest_path: Union[str, Path]) -> Path:
    """Write the sidecar for the shards of a manifest; returns the ``.nv-meta`` folder."""
    file = manifest_file(manifest_path)
    manifest = load_manifest(file)
    root = file.parent.resolve()
    counts: Dict[str, int] = {}
    caption_layout = manifest.kind == "caption"
    for shard in manifest.shard_paths:
        name = os.path.relpath(shard, root)
        if name.startswith(".."):
            raise ValueError(
                f"shard {shard} is outside {root}; energon names shards relative to the "
                f"dataset folder, so move the shards next to {file.name}"
            )
        offsets, parts = sample_offsets(shard)
        _write_index(Path(shard), offsets)
        counts[name] = len(parts)
        caption_layout = caption_layout and all(_is_tool_caption(p) for p in parts)
    meta = root / NV_META
    meta.mkdir(exist_ok=True)
    _write(meta / ".info.json", json.dumps({"shard_counts": counts}, indent=2) + "\n")
    split = {"split_parts": {"train": list(counts), "val": [], "test": []}, "exclude": []}
    _write(meta / "split.yaml", yaml.safe_dump(split, sort_keys=False))
    _write(meta / "dataset.yaml", yaml.safe_dump(_dataset_yaml(manifest.kind, caption_layout)))
    logger.info("wrote energon metadata for %d shards in %s", len(counts), meta)
    return meta


def _is_tool_caption(parts: List[str]) -> bool:
    images = [part for part in parts if part.startswith("0.")]
    return "json" in parts and len(images) == 1 and len(parts) == 2


def _dataset_yaml(kind: str, caption_layout: bool) -> Dict[str, object]:
    if caption_layout:
        return {
            "sample_type": {"__module__": "megatron.energon", "__class__": "CaptioningSample"},
            "field_map": dict(CAPTION_FIELD_MAP),
        }
    return {
        "__module__": "megatron.energon",
        "__class__": "CrudeWebdataset",
        "subflavors": {KIND_SUBFLAVOR: kind},
    }


def _write_index(tar_path: Path, offsets: List[int]) -> None:
    index = tar_path.with_suffix(".tar.idx")
    _write_bytes(index, struct.pack(f"<{len(offsets)}Q", *offsets))


def _write(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
