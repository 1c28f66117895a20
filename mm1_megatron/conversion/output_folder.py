"""The output folder of ``mm1 convert``: checked before any work, staged, then swapped in.

- An output may not be, contain or lie inside one of the conversion's inputs (symlinks
  resolved), with or without ``--overwrite``.
- Every output carries ``.mm1_megatron_output.json``, which lists what the conversion
  wrote. ``--overwrite`` replaces only such a folder, and only when it holds nothing
  else: a folder without the marker, or with entries the marker does not list, is
  refused and left as it is.
- The output is written to a hidden sibling (``.tmp-<name>``) and swapped in when
  complete, so a conversion that fails midway leaves the previous output untouched.
- Whether the output can be written at all is tried before the expensive work.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Set

from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)

MARKER = ".mm1_megatron_output.json"
MAX_NAMED = 5
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _names(entries: Iterable[str]) -> str:
    entries = sorted(entries)
    more = f" and {len(entries) - MAX_NAMED} more" if len(entries) > MAX_NAMED else ""
    return ", ".join(entries[:MAX_NAMED]) + more


def check_not_an_input(folder: Path, inputs: Iterable[Optional[Path]]) -> None:
    """Refuse an output that is, contains or lies inside an input (symlinks resolved)."""
    output = Path(folder).resolve()
    for source in inputs:
        if source is None:
            continue
        source_path = Path(source).resolve()
        if output == source_path:
            relation = "is"
        elif source_path.is_relative_to(output):
            relation = "contains"
        elif output.is_relative_to(source_path):
            relation = "lies inside"
        else:
            continue
        given = (Path(os.path.abspath(folder)), Path(os.path.abspath(source)))
        links = (
            f" (links resolved: {output} and {source_path})"
            if given != (output, source_path)
            else ""
        )
        raise ConversionError(
            f"--output {folder} {relation} the input {source}{links}; a conversion never "
            f"writes where it reads: choose an --output outside every input"
        )


def _read_marker(folder: Path) -> Set[str]:
    """The entries an earlier conversion wrote into ``folder``, from its marker."""
    path = folder / MARKER
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(
            f"cannot read {path} ({type(exc).__name__}: {exc}), so --overwrite cannot tell "
            f"what an earlier conversion wrote; delete {folder} yourself or choose another "
            f"--output"
        ) from None
    if not isinstance(entries, list) or not all(
        isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
        for name in entries
    ):
        raise ConversionError(f"{path}: 'entries' must be a list of names inside {folder}")
    return set(entries)


def replaceable_entries(folder: Path) -> Set[str]:
    """The names ``--overwrite`` may remove from the non-empty ``folder``, or an error."""
    present = {entry.name for entry in folder.iterdir()}
    if MARKER not in present:
        raise ConversionError(
            f"--overwrite replaces only a folder written by mm1 convert, and {folder} has "
            f"no {MARKER} (it holds {_names(present)}); delete it yourself if it is "
            f"disposable, or choose another --output"
        )
    listed = _read_marker(folder)
    foreign = present - listed - {MARKER}
    if foreign:
        raise ConversionError(
            f"{folder} holds entries the earlier conversion did not write ({_names(foreign)}); "
            f"--overwrite removes only what mm1 convert wrote: move them out of the folder "
            f"or choose another --output"
        )
    return listed


def _check_writable(folder: Path) -> None:
    """Create and remove a folder in the nearest existing ancestor of ``folder``."""
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConversionError(f"cannot create --output {folder}: {ancestor} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mm1-convert-probe-", dir=ancestor))
    except OSError as exc:
        raise ConversionError(
            f"cannot write --output {folder}: {ancestor} is not writable ({exc.strerror}); "
            f"choose a folder you can write to"
        ) from None


def check_output_folder(folder, *, overwrite: bool, inputs: Iterable[Optional[Path]] = ()) -> Path:
    """Everything about ``--output`` that can be checked before converting."""
    folder = Path(folder)
    check_not_an_input(folder, inputs)
    if folder.exists() and not folder.is_dir():
        raise ConversionError(f"--output {folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"output folder {folder} is not empty; choose another folder or pass "
                f"--overwrite to replace an earlier mm1 convert output"
            )
        replaceable_entries(folder)
    _check_writable(folder)
    return folder


def _is_write_error(exc: OSError, folders) -> bool:
    """An error writing the output, not one reading an input: a full or read-only disk,
    or a failure on a path of the output."""
    if exc.errno in WRITE_ERRNOS:
        return True
    names = (exc.filename, exc.filename2)
    paths = [os.path.abspath(name) for name in names if isinstance(name, (str, os.PathLike))]
    return any(
        Path(path).is_relative_to(os.path.abspath(folder)) for path in paths for folder in folders
    )


def _write_error(folder: Path, exc: OSError) -> ConversionError:
    where = f" ({exc.filename})" if exc.filename else ""
    return ConversionError(
        f"cannot write --output {folder}: {exc.strerror or exc}{where}; nothing was replaced"
    )


def _remove_entries(old: Path, names: Iterable[str]) -> None:
    for name in names:
        path = old / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    old.rmdir()  # fails, keeping the folder, if anything unlisted appeared meanwhile


def _swap_in(staging: Path, folder: Path, overwrite: bool) -> None:
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:  # appeared while converting
            raise ConversionError(f"output folder {folder} is no longer empty; nothing written")
        listed = replaceable_entries(folder)  # again: files may have appeared meanwhile
    elif folder.is_dir():
        folder.rmdir()
        listed = None
    else:
        listed = None
    if listed is None:
        staging.rename(folder)
        return
    old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    folder.rename(old)
    try:
        staging.rename(folder)
    except OSError:
        old.rename(folder)
        raise
    try:
        _remove_entries(old, listed | {MARKER})
    except OSError as exc:
        logger.warning("the previous output is kept in %s (%s); delete it yourself", old, exc)


@contextmanager
def staged_output(
    folder, *, overwrite: bool, command: str, inputs: Iterable[Optional[Path]] = ()
) -> Iterator[Path]:
    """Yields an empty staging folder; on success it becomes ``folder`` (with the marker
    listing its entries), replacing an earlier output only as ``check_output_folder``
    allows. On failure the staging folder goes and ``folder`` is untouched."""
    inputs = list(inputs)
    # Symlinks resolved: a link named as --output is followed, never replaced.
    folder = check_output_folder(folder, overwrite=overwrite, inputs=inputs).resolve()
    staging = folder.parent / f".tmp-{folder.name}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise _write_error(folder, exc) from None
    try:
        yield staging
        entries = sorted(entry.name for entry in staging.iterdir())
        marker = {"written_by": f"mm1 convert {command}", "entries": entries}
        (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _swap_in(staging, folder, overwrite)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError) and _is_write_error(exc, (staging, folder)):
            raise _write_error(folder, exc) from None
        raise
