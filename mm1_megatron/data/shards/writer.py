"""Write samples into numbered tar shards plus a manifest, resumably.

``build_shards`` reads items (segments whose images are local files) in a fixed order and
writes ``<prefix>-000000.tar``, ``<prefix>-000001.tar``, ... with ``samples_per_shard``
samples each. A shard is written as ``*.tar.partial`` and renamed when full, and only
then entered into ``manifest.json`` together with the number of input items it covers.
Rerunning the same command after an interruption keeps every finished shard and starts
again at the first item that no finished shard covers (a partial shard is rewritten).

Items whose image file is missing or empty are skipped and counted; with
``verify_images`` every image is also decoded once with Pillow and corrupt ones skip
their item. Image bytes are copied as they are (no re-encoding); a video's frames are
encoded once, when its ``LazyItem`` is written (``video_records.py``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from mm1_megatron.data.shards.conversations import parse_llava_record
from mm1_megatron.data.shards.preference_records import parse_preference_record
from mm1_megatron.data.shards.reader import (
    MANIFEST_NAME,
    SHARD_KINDS,
    load_manifest,
    manifest_file,
    write_manifest,
)
from mm1_megatron.data.shards.records import (
    conversation_members,
    image_extension_of,
    record_members,
)
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.utils.progress import ProgressLine

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFile:
    path: Optional[Path]  # None: the item named an image that cannot be found (e.g. a URL)
    name: str = ""  # what the input called it, for messages


@dataclass(frozen=True)
class EncodedImage:
    """An image made at build time (a decoded video frame): its bytes, as they are."""

    data: bytes
    name: str  # for messages
    extension: str


InputSegment = Union[str, ImageFile]


@dataclass(frozen=True)
class ConversationItem:
    """A LLaVA-style conversation (or preference) record and its image files (in marker
    order); in the shard its ``image`` names the sample's image members."""

    record: Dict[str, object]
    images: Tuple[Union[ImageFile, EncodedImage], ...]


@dataclass(frozen=True)
class LazyItem:
    """An item made only when it is written (a video decoded then), so a resumed build
    passes the items its finished shards cover without making them. ``make`` raises
    ``BadSample`` for an input to skip."""

    make: Callable[[], Item]


Item = Union[Sequence[InputSegment], ConversationItem, LazyItem]
# How a shard kind of LLaVA-style records checks one before it is written.
RECORD_PARSERS = {"conversation": parse_llava_record, "preference": parse_preference_record}


class SkipItem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class ShardWriter:
    """Appends samples to the current shard; see the module docstring for resuming."""

    def __init__(
        self,
        out_dir: Union[str, Path],
        *,
        kind: str,
        samples_per_shard: int,
        input_id: str,
        prefix: Optional[str] = None,
    ):
        if kind not in SHARD_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {SHARD_KINDS}")
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.kind, self.samples_per_shard, self.input_id = kind, samples_per_shard, input_id
        self.prefix = prefix or kind
        self.shards: List[Dict[str, object]] = []
        self.resume_from = 0
        self._load_existing()
        self._tar: Optional[tarfile.TarFile] = None
        self._num_in_shard = 0

    def _load_existing(self) -> None:
        file = manifest_file(self.out_dir)
        if file.exists():
            manifest = load_manifest(file)
            if manifest.kind != self.kind or manifest.extra.get("input_id") != self.input_id:
                raise ValueError(
                    f"{self.out_dir} already holds {manifest.kind} shards built "
                    f"from other inputs or options; use a new output folder"
                )
            self.shards = list(manifest.extra.get("shard_inputs", []))
            self.resume_from = int(self.shards[-1]["input_end"]) if self.shards else 0
        for stale in self.out_dir.glob("*.tar.partial"):
            stale.unlink()

    @property
    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def add(self, key: str, members: Dict[str, bytes], input_position: int) -> None:
        if self._tar is None:
            self._tar = tarfile.open(
                self.out_dir / (self._shard_name + ".partial"), "w", format=tarfile.PAX_FORMAT
            )
        for extension, data in members.items():
            info = tarfile.TarInfo(name=f"{key}.{extension}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._num_in_shard += 1
        if self._num_in_shard == self.samples_per_shard:
            self._finish_shard(input_position + 1)

    def close(self, input_end: int) -> Path:
        """Finish the last shard; ``input_end``: number of input items read in all."""
        if self._tar is not None:
            self._finish_shard(input_end)
        return self._write_manifest(complete=True)

    def _finish_shard(self, input_end: int) -> None:
        self._tar.close()
        name = self._shard_name
        os.replace(self.out_dir / (name + ".partial"), self.out_dir / name)
        self.shards.append(
            {"path": name, "num_samples": self._num_in_shard, "input_end": input_end}
        )
        self._tar, self._num_in_shard = None, 0
        self._write_manifest(complete=False)

    def _write_manifest(self, complete: bool) -> Path:
        entries = [{"path": s["path"], "num_samples": s["num_samples"]} for s in self.shards]
        return write_manifest(
            self.out_dir / MANIFEST_NAME,
            self.kind,
            entries,
            input_id=self.input_id,
            complete=complete,
            shard_inputs=self.shards,
        )


def inputs_id(*parts: object) -> str:
    """A short id of the inputs and options, so a resumed run cannot mix two corpora."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def _members_of(item: Item, kind: str, verify_images: bool) -> Dict[str, bytes]:
    if isinstance(item, LazyItem):
        try:
            item = item.make()
        except BadSample as error:
            raise SkipItem(error.reason, error.detail) from error
    if isinstance(item, ConversationItem):
        assert kind in RECORD_PARSERS, f"{kind} shards do not hold conversation records"
        try:
            RECORD_PARSERS[kind]({**item.record, "image": [f.name for f in item.images]})
        except BadSample as error:
            raise SkipItem(error.reason, error.detail) from error
        images = [_image_bytes(image, verify_images) for image in item.images]
        return conversation_members(item.record, images)
    resolved: List[Union[str, tuple]] = [
        segment if isinstance(segment, str) else _image_bytes(segment, verify_images)
        for segment in item
    ]
    return record_members(resolved)


def _image_bytes(image: Union[ImageFile, EncodedImage], verify_images: bool) -> Tuple[bytes, str]:
    if isinstance(image, EncodedImage):
        return image.data, image.extension
    if image.path is None or not image.path.is_file():
        raise SkipItem("missing_image", f"image {image.name or image.path} not found")
    data = image.path.read_bytes()
    if not data:
        raise SkipItem("empty_file", f"image {image.path} is empty")
    if verify_images:
        _verify(data, image.path)
    return data, image_extension_of(data, image.path.suffix.lstrip(".") or "jpg")


def _verify(data: bytes, path: Path) -> None:
    """Decode as training will (the same pixel limit and modes): a skip here is a skip
    there."""
    from mm1_megatron.data.shards.image_modes import decode_rgb

    try:
        decode_rgb(data).close()
    except BadSample as exc:
        raise SkipItem(exc.reason, f"image {path}: {exc.detail}") from exc


def build_shards(
    items: Iterable[Item],
    out_dir: Union[str, Path],
    *,
    kind: str,
    samples_per_shard: int,
    input_id: str,
    verify_images: bool = False,
    total: Optional[int] = None,
    progress: bool = True,
) -> Dict[str, int]:
    """Write every item as one sample; returns counts (``written`` and skip reasons)."""
    writer = ShardWriter(out_dir, kind=kind, samples_per_shard=samples_per_shard, input_id=input_id)
    counts: Counter = Counter()
    bar = ProgressLine(f"{kind} shards", total, unit="items") if progress else None
    if bar is not None:
        bar.count = writer.resume_from
    if writer.resume_from:
        logger.info(
            "resuming: %d finished shards cover the first %d items",
            len(writer.shards),
            writer.resume_from,
        )
    position = -1
    for position, item in enumerate(items):
        if position < writer.resume_from:
            continue
        try:
            members = _members_of(item, kind, verify_images)
        except SkipItem as skip:
            counts[skip.reason] += 1
            logger.warning("item %d skipped: %s", position, skip)
        else:
            writer.add(f"{position:09d}", members, position)
            counts["written"] += 1
        if bar is not None:
            bar.update(1, note=f"{len(writer.shards)} shards")
    writer.close(position + 1)
    if bar is not None:
        bar.close()
    counts["shards"] = len(writer.shards)
    return dict(counts)
