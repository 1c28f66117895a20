"""WebDataset-style tar shards: manifests, a header index per shard, random-access reads.

A shard is an uncompressed tar whose members are grouped into samples by *key*: the
member name up to the first dot of its last path component (``a/b/000017.0.jpg`` has key
``a/b/000017`` and extension ``0.jpg``). A sample's members must be adjacent, as
WebDataset writes them. Only regular files count; directories, links and devices are
ignored.

Member names are never used as filesystem paths and nothing is extracted: a shard is
scanned once per process for its members' byte ranges (``scan_shard``) and members are
then read with ``os.pread``. A member whose data runs past the end of the file, or
anything after a broken header, is reported as ``truncated_tar``; the scan says what a
damaged shard lost (``ShardIndex.damage``), logged once per shard and process by the
reader and for every shard by ``index_existing_shards``.

A manifest (``manifest.json``) lists a corpus's shards and their sample counts, so a
loader can map a sample number to a shard without opening every shard:

    {"format": "mm1_megatron.shards", "version": 1, "kind": "caption",
     "shards": [{"path": "caption-000000.tar", "num_samples": 1000}, ...]}

Shard paths are relative to the manifest's folder. Compressed tars are refused.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Set, Tuple, Union

from mm1_megatron.data.shards.records import NATIVE_RECORDS, RecordFormat
from mm1_megatron.data.shards.skips import BadSample

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "mm1_megatron.shards"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_KINDS = ("caption", "interleaved", "conversation", "preference")
MAX_OPEN_SHARDS = 32

COMPRESSION_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

MemberRange = Tuple[int, int]  # byte offset of the data, size


@dataclass
class ShardSample:
    key: str
    members: Dict[str, MemberRange]  # extension -> byte range
    truncated: bool = False  # some member's data is past the end of the file


@dataclass
class ShardIndex:
    path: str
    samples: List[ShardSample]
    truncated: bool = False  # a broken header or short data: later samples are lost
    damage: str = ""  # what the shard lost (or may have), for a warning; "" when intact


@dataclass
class Manifest:
    kind: str
    shard_paths: List[str]  # absolute
    shard_sizes: List[int]  # samples per shard, as the manifest states
    path: str = ""
    extra: Dict[str, object] = field(default_factory=dict)
    records: RecordFormat = NATIVE_RECORDS  # how its samples are read
    excluded: FrozenSet[Tuple[str, int]] = frozenset()  # (shard path, sample number) left out

    @property
    def num_samples(self) -> int:
        return sum(self.shard_sizes)


def split_member_name(name: str) -> Tuple[str, str]:
    """``dir/000017.0.jpg`` -> (``dir/000017``, ``0.jpg``); no dot: the extension is ``""``."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def scan_shard(path: Union[str, Path]) -> ShardIndex:
    """Byte ranges of every sample's members; never raises for a damaged shard (its
    ``damage`` says what was lost)."""
    path = str(path)
    samples: List[ShardSample] = []
    try:
        file_size = os.path.getsize(path)
        with tarfile.open(path, mode="r:") as archive:
            while True:
                try:
                    info = archive.next()
                except (tarfile.ReadError, EOFError, OSError) as exc:
                    if archive.offset >= file_size:  # cut in the padding after a member
                        return _check_end(path, samples, file_size, file_size)
                    damage = f"unreadable from byte {archive.offset} on ({exc})"
                    return ShardIndex(path, samples, truncated=True, damage=damage)
                if info is None:
                    return _check_end(path, samples, archive.offset, file_size)
                if not info.isfile():
                    continue
                key, extension = split_member_name(info.name)
                if not samples or samples[-1].key != key:
                    samples.append(ShardSample(key=key, members={}))
                if info.offset_data + info.size > file_size:  # nothing can follow
                    samples[-1].truncated = True
                    missing = info.offset_data + info.size - file_size
                    damage = (
                        f"the file ends inside sample {samples[-1].key!r} (its member "
                        f"{info.name!r} lacks {missing} of its {info.size} bytes): that "
                        f"sample and any after it are lost"
                    )
                    return ShardIndex(path, samples, truncated=True, damage=damage)
                samples[-1].members[extension] = (info.offset_data, info.size)
    except (tarfile.ReadError, OSError) as exc:
        return ShardIndex(path, samples, truncated=True, damage=f"not a readable tar ({exc})")


def _check_end(path: str, samples: List[ShardSample], end: int, file_size: int) -> ShardIndex:
    """The scan stopped at byte ``end``: tar's end-of-archive (zero) block, or bytes that
    are no header (tarfile stops there silently), or the end of the file."""
    with open(path, "rb") as file:
        file.seek(end)
        rest = file.read(512)
    if rest and not rest.strip(b"\0"):
        return ShardIndex(path, samples)  # the end-of-archive marker (possibly cut short)
    if not rest:
        damage = (
            f"the file ends at byte {file_size} without tar's end-of-archive marker: "
            "samples after the last may have been cut off"
        )
        return ShardIndex(path, samples, damage=damage)
    damage = (
        f"its last {file_size - end} bytes (from byte {end}) are not a readable tar header: "
        "the samples stored there are lost"
    )
    return ShardIndex(path, samples, truncated=True, damage=damage)


def warn_damaged(index: ShardIndex) -> None:
    if index.damage:
        logger.warning(
            "shard %s is damaged: %s; %d samples readable (%d of them cut off, skipped as "
            "truncated_tar)",
            index.path,
            index.damage,
            len(index.samples),
            sum(sample.truncated for sample in index.samples),
        )


def check_plain_tar(path: Union[str, Path]) -> None:
    """``ValueError`` for a missing or compressed shard (no random access into those)."""
    try:
        with open(path, "rb") as file:
            head = file.read(6)
    except OSError as exc:
        raise ValueError(f"shard {path} cannot be read: {exc}") from exc
    for magic, name in COMPRESSION_MAGIC:
        if head.startswith(magic):
            raise ValueError(
                f"shard {path} is {name}-compressed; shards must be plain .tar "
                f"files (random access needs byte offsets): decompress it"
            )


class ShardReader:
    """Per-process cache of open shards and their indices (re-opened after a fork)."""

    def __init__(self, max_open: int = MAX_OPEN_SHARDS):
        self.max_open = max_open
        self._pid = -1
        self._open: OrderedDict[str, Tuple[int, ShardIndex]] = OrderedDict()
        self._warned: Set[str] = set()  # damaged shards already logged by this process

    def index(self, path: str) -> ShardIndex:
        return self._entry(path)[1]

    def sample(self, path: str, position: int) -> ShardSample:
        """The ``position``-th sample of the shard; ``BadSample`` if the shard lost it."""
        index = self.index(path)
        if position >= len(index.samples):
            raise BadSample(
                "truncated_tar",
                f"sample {position} is past the {len(index.samples)} readable samples of the shard",
            )
        return index.samples[position]

    def read(self, path: str, member: MemberRange) -> bytes:
        fd = self._entry(path)[0]
        offset, size = member
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise BadSample("truncated_tar", f"read {len(data)} of {size} bytes")
        return data

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd, _ in self._open.values():
                os.close(fd)
        self._open.clear()

    def _entry(self, path: str) -> Tuple[int, ShardIndex]:
        if self._pid != os.getpid():  # a forked worker must not share the parent's fds
            self._open = OrderedDict()
            self._pid = os.getpid()
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        index = scan_shard(path)
        if index.damage and path not in self._warned:
            self._warned.add(path)
            warn_damaged(index)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise BadSample("truncated_tar", f"cannot open shard: {exc}") from exc
        self._open[path] = (fd, index)
        while len(self._open) > self.max_open:
            old_fd, _ = self._open.popitem(last=False)[1]
            os.close(old_fd)
        return self._open[path]


def manifest_file(path: Union[str, Path]) -> Path:
    """A manifest path, or a folder holding ``manifest.json``."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def load_manifest(path: Union[str, Path], kind: Optional[str] = None) -> Manifest:
    file = manifest_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot read shard manifest {file}: {exc}; build one with `mm1 data shards`"
        ) from exc
    if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{file} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest")
    if kind is not None and data.get("kind") != kind:
        raise ValueError(
            f"{file} lists {data.get('kind')!r} shards but is configured as a {kind!r} source"
        )
    shards = data.get("shards", [])
    paths = [str((file.parent / entry["path"]).resolve()) for entry in shards]
    sizes = [int(entry["num_samples"]) for entry in shards]
    extra = {k: v for k, v in data.items() if k not in ("format", "version", "kind", "shards")}
    return Manifest(
        kind=data["kind"], shard_paths=paths, shard_sizes=sizes, path=str(file), extra=extra
    )


def write_manifest(
    path: Union[str, Path], kind: str, shards: List[Dict[str, object]], **extra: object
) -> Path:
    """Write atomically; ``shards`` entries need ``path`` (relative) and ``num_samples``."""
    if kind not in SHARD_KINDS:
        raise ValueError(f"shard kind {kind!r} is not one of {SHARD_KINDS}")
    file = manifest_file(path)
    payload = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": kind,
        "shards": shards,
        **extra,
    }
    temporary = file.with_name(file.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, file)
    return file


def index_existing_shards(
    tar_paths: List[Union[str, Path]], manifest_path: Union[str, Path], kind: str
) -> Path:
    """A manifest for shards written by other tools (e.g. img2dataset): scans each once."""
    file = manifest_file(manifest_path)
    entries = []
    num_damaged = 0
    for tar_path in tar_paths:
        check_plain_tar(tar_path)
        index = scan_shard(tar_path)
        warn_damaged(index)
        num_damaged += bool(index.damage)
        relative = os.path.relpath(Path(tar_path).resolve(), file.parent.resolve())
        entries.append({"path": relative, "num_samples": len(index.samples)})
    if num_damaged:
        logger.warning("%d of %d shards are damaged (warnings above)", num_damaged, len(entries))
    return write_manifest(file, kind, entries)
