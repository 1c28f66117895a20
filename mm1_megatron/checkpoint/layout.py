"""Checkpoint folders on disk: naming, the ``latest`` pointer, manifests, retention.

::

    save_dir/
      latest                     text: name of the newest complete checkpoint
      step_00000100/
        model_optim/             Megatron-Core dist_checkpointing (torch_dist) folder
        trainer_state.json       step, consumed samples, scheduler, data loader, layout
        config.yaml              the resolved run config
        rng/rank_00000.pt        per-rank RNG states (tensors and ints only)
        manifest.json            every file above with its size and SHA-256, written last
      .tmp-step_00000200/        a save in progress (never loaded, removed on restart)

A checkpoint folder only ever appears under its final name once every rank has
finished writing and the manifest is in place (write to ``.tmp-*``, then rename), and
``latest`` is replaced atomically after that. A crash at any moment therefore leaves
``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from mm1_megatron.checkpoint.manifest import (  # noqa: F401 (re-exported)
    MANIFEST_FILE,
    CorruptCheckpointError,
    verify_manifest,
    write_atomically,
    write_manifest,
)

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
MODEL_OPTIM_DIR = "model_optim"
TRAINER_STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
_STEP_PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> Optional[int]:
    match = _STEP_PATTERN.match(Path(path).name)
    return int(match.group(1)) if match else None


def temporary_path(save_dir: Path, step: int) -> Path:
    return Path(save_dir) / f"{TMP_PREFIX}{checkpoint_name(step)}"


def publish(save_dir: Path, step: int) -> Path:
    """Rename the finished temporary folder to its final name and point ``latest`` at it."""
    save_dir = Path(save_dir)
    final = save_dir / checkpoint_name(step)
    if final.exists():  # a re-run of the same step (e.g. after a crash mid-retention)
        shutil.rmtree(final)
    os.replace(temporary_path(save_dir, step), final)
    write_atomically(save_dir / LATEST_FILE, final.name + "\n")
    return final


def read_latest(save_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or None. Only a bare ``step_N`` name counts: a path
    (absolute, ``..``, or any other name) is ignored with a warning, so what is checked
    and loaded is always a folder of ``save_dir``."""
    pointer = Path(save_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not name:
        return None
    if step_of(Path(name)) is None or name != Path(name).name:
        logger.warning(
            "ignoring %s: %r is not the name of a step_N folder of %s",
            pointer,
            name[:200],
            save_dir,
        )
        return None
    return Path(save_dir) / name


def complete_checkpoints(save_dir: Path) -> List[Path]:
    """Final-named checkpoint folders, newest first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=step_of, reverse=True)


def candidates_for_resume(save_dir: Path) -> List[Path]:
    """``latest`` first, then every other checkpoint, newest first."""
    latest = read_latest(save_dir)
    ordered = [latest] if latest is not None else []
    ordered += [p for p in complete_checkpoints(save_dir) if p != latest]
    return ordered


def remove_stale_temporaries(save_dir: Path) -> None:
    for path in Path(save_dir).glob(f"{TMP_PREFIX}*"):
        logger.warning("removing incomplete checkpoint %s (a save was interrupted)", path)
        shutil.rmtree(path, ignore_errors=True)


def apply_retention(save_dir: Path, *, keep_last: int, keep_every: int) -> List[Path]:
    """Delete checkpoints beyond the newest ``keep_last``, sparing multiples of
    ``keep_every`` and whatever ``latest`` names. Returns what was removed."""
    checkpoints = complete_checkpoints(save_dir)
    latest = read_latest(save_dir)
    removed = []
    for path in checkpoints[max(keep_last, 1) :]:
        step = step_of(path)
        if path == latest or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
