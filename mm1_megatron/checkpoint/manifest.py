"""A checkpoint's ``manifest.json``: the size and SHA-256 of every file, checked on load.

Each rank hashes the files it wrote itself (its ``__<rank>_*.distcp`` shards and its RNG
file) as soon as they are on disk, in the background writer for asynchronous saves, and
leaves the digests in ``.digests/rank_<r>.json``. Rank 0 then hashes what no rank claimed
(metadata, ``common.pt``, trainer state, config), merges everything into the manifest and
removes ``.digests/``. Loading checks every file's size and, shared out over the ranks,
its digest, so a damaged newest checkpoint is skipped like a truncated one.

Manifests written before checksums (``{"files": {name: size}}``) are still accepted, by
size. SHA-256 runs at 1.3-1.8 GB/s per core on x86 with SHA extensions (measured: see
``docs/benchmarks.md``, "Checkpoint checksums").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
DIGESTS_DIR = ".digests"
HASH_NAME = "sha256"
MANIFEST_VERSION = 2
_READ_CHUNK = 16 << 20  # hashlib releases the GIL on chunks this large
_HASH_THREADS = 4  # files read and hashed at once: one's read overlaps another's hashing


class CorruptCheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged."""


def file_digest(path: Path) -> str:
    digest = hashlib.new(HASH_NAME)
    with open(path, "rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(path: Path) -> Dict[str, object]:
    return {"size": path.stat().st_size, HASH_NAME: file_digest(path)}


def files_of_rank(folder: Path, rank: int) -> List[Path]:
    """The files rank ``rank`` writes into a checkpoint folder on its own: its
    ``dist_checkpointing`` shards and its RNG states."""
    folder = Path(folder)
    owned = sorted(folder.glob(f"model_optim/__{rank}_*.distcp"))
    rng = folder / "rng" / f"rank_{rank:05d}.pt"
    return owned + ([rng] if rng.is_file() else [])


def _entries(folder: Path, paths: Sequence[Path]) -> Dict[str, Dict[str, object]]:
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        return dict(zip((str(p.relative_to(folder)) for p in paths), pool.map(_entry, paths)))


def write_rank_digests(folder: Path, rank: int) -> None:
    """Hash this rank's own files of ``folder`` (a save in progress) for the manifest."""
    folder = Path(folder)
    entries = _entries(folder, files_of_rank(folder, rank))
    out = folder / DIGESTS_DIR / f"rank_{rank:05d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(entries))


def write_manifest(folder: Path) -> None:
    """Record the size and digest of every file of ``folder``: the ranks' digests where
    they left them, the rest hashed here. Written last, atomically."""
    folder = Path(folder)
    claimed: Dict[str, Dict[str, object]] = {}
    for part in sorted((folder / DIGESTS_DIR).glob("rank_*.json")):
        claimed.update(json.loads(part.read_text()))
    unclaimed = []
    for path in sorted(folder.rglob("*")):
        relative = str(path.relative_to(folder))
        if not path.is_file() or path.name == MANIFEST_FILE or relative.startswith(DIGESTS_DIR):
            continue
        entry = claimed.get(relative)
        if entry is None or entry["size"] != path.stat().st_size:
            unclaimed.append(path)
    files = {name: claimed[name] for name in claimed if (folder / name).is_file()}
    files.update(_entries(folder, unclaimed))
    files = dict(sorted(files.items()))
    manifest = {"version": MANIFEST_VERSION, "hash": HASH_NAME, "files": files}
    write_atomically(folder / MANIFEST_FILE, json.dumps(manifest, indent=1))
    shutil.rmtree(folder / DIGESTS_DIR, ignore_errors=True)


def read_manifest(folder: Path) -> Dict[str, Dict[str, object]]:
    """``{relative path: {"size": n, "sha256": hex or absent}}``; raises
    ``CorruptCheckpointError`` when the folder or its manifest is missing or unreadable."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise CorruptCheckpointError(f"{folder} does not exist")
    if not manifest_path.is_file():
        raise CorruptCheckpointError(f"{folder} has no {MANIFEST_FILE}: the save never finished")
    try:
        files = json.loads(manifest_path.read_text())["files"]
        return {
            name: entry if isinstance(entry, dict) else {"size": int(entry)}
            for name, entry in files.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptCheckpointError(f"{manifest_path} is unreadable: {exc}") from None


def _problem(path: Path, entry: Dict[str, object], contents: bool) -> Optional[str]:
    if not path.is_file():
        return f"{path} is missing"
    actual = path.stat().st_size
    if actual != entry["size"]:
        return f"{path} has {actual} bytes, the manifest says {entry['size']}"
    expected = entry.get(HASH_NAME)
    if contents and expected is not None and file_digest(path) != expected:
        return f"{path} is damaged: its {HASH_NAME} differs from the manifest's"
    return None


def check_files(
    folder: Path, names: Sequence[str], files: Dict[str, Dict[str, object]], *, contents: bool
) -> Optional[str]:
    """The first problem among ``names`` (missing, resized, different content), or None.
    Files are read and hashed a few at a time (hashlib and reads release the GIL), so
    one file's read overlaps another's hashing."""
    sizes_first = [_problem(Path(folder) / n, files[n], contents=False) for n in names]
    problem = next((p for p in sizes_first if p is not None), None)
    if problem is not None or not contents:
        return problem
    with ThreadPoolExecutor(max_workers=_HASH_THREADS) as pool:
        found = pool.map(lambda n: _problem(Path(folder) / n, files[n], contents=True), names)
        return next((p for p in found if p is not None), None)


def verify_manifest(folder: Path, *, share: Tuple[int, int] = (0, 1)) -> None:
    """Raise ``CorruptCheckpointError`` naming the first missing, resized or changed file.

    ``share=(i, n)`` checks only every n-th file from the i-th: ranks split the reading
    of a large checkpoint this way (``CheckpointManager``); the default checks all."""
    files = read_manifest(folder)
    index, count = share
    names = sorted(files)[index::count]
    if not any(HASH_NAME in entry for entry in files.values()):
        logger.info("%s has a size-only manifest (written before checksums)", folder)
    problem = check_files(folder, names, files, contents=True)
    if problem is not None:
        raise CorruptCheckpointError(problem)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
