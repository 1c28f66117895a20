"""Reading the pickled files of a checkpoint without running code from them.

torch's ``FileSystemReader.read_metadata`` reads ``.metadata`` with ``pickle.load``, and a
pickle can name any importable callable (``os.system``) and call it. A checkpoint is data
that gets exchanged, so ``.metadata`` is read here by ``RestrictedUnpickler``, whose
``find_class`` admits exactly the classes torch's ``Metadata`` is made of
(``METADATA_GLOBALS`` plus the ``torch`` dtypes). The rest of a checkpoint that is pickled
(``common.pt``, the byte items inside ``.distcp`` files) is read by ``torch.load`` with
``weights_only=True`` (``load_weights_only``): torch's own allowlist of tensors and plain
containers. ``compat/checkpointing.py`` installs both into the readers.

Every refusal or unreadable file raises ``CheckpointFileError``, a ``ValueError`` that
names the file (and the refused global), so the commands exit with code 2.
"""

from __future__ import annotations

import importlib
import pickle
import re
from pathlib import PurePath
from typing import Any, BinaryIO, Dict, List, Optional, Tuple

import torch

METADATA_GLOBALS: Tuple[Tuple[str, str], ...] = (
    # torch.distributed.checkpoint.Metadata and what its fields hold (tensor and bytes
    # entries, chunk boxes, storage locations, the save's identity).
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    # megatron-core's writers (0.16 and 0.19) store every rank's save plan in the
    # metadata (``all_local_plans``) to reuse it on the next save.
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch.distributed.checkpoint.planner", "BytesIOWriteData"),  # a WriteItem field
    ("torch", "Size"),
    # torch's own FileSystemWriter stores StorageMeta.checkpoint_id as a path object
    # (megatron-core's writer stores a str); building one does no I/O.
    ("pathlib", "PosixPath"),
    # torch pickles a layout as ``_get_layout("torch.strided")``; answered by
    # ``_layout_from_name`` below, which can only return a torch.layout.
    ("torch.serialization", "_get_layout"),
)


class CheckpointFileError(ValueError):
    """A file of a checkpoint is unreadable, or holds something we refuse to unpickle.
    Built from one message (so it survives being pickled between ranks)."""


class UnsafePickleError(CheckpointFileError):
    """A pickled checkpoint file names a global outside the allowlist."""


def refusal(source: str, global_name: str, *, allowed: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{source}: refused to unpickle {global_name} (a checkpoint's pickled files may only "
        f"hold {allowed}); nothing from the file was run. The checkpoint was not written by "
        "torch/megatron-core as is: it was tampered with or comes from an unknown source"
    )


def unreadable(source: str, what: str, exc: BaseException) -> CheckpointFileError:
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return CheckpointFileError(
        f"{source} is not a readable {what} ({type(exc).__name__}: {detail}); "
        "the checkpoint is damaged"
    )


def _layout_from_name(name: str) -> torch.layout:
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch.layout {name!r}")
    return layouts[name]


def allowed_globals() -> Dict[Tuple[str, str], Any]:
    """``(module, name) -> object`` the metadata unpickler may return: the entries of
    ``METADATA_GLOBALS`` present in the installed torch, and every ``torch.<dtype>``."""
    found: Dict[Tuple[str, str], Any] = {
        ("torch", name): value
        for name, value in vars(torch).items()
        if isinstance(value, torch.dtype)
    }
    for module_name, name in METADATA_GLOBALS:
        if (module_name, name) == ("torch.serialization", "_get_layout"):
            found[(module_name, name)] = _layout_from_name
            continue
        value = getattr(importlib.import_module(module_name), name, None)
        if value is not None:
            found[(module_name, name)] = value
    return found


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``allowed`` globals and no persistent ids."""

    def __init__(
        self,
        stream: BinaryIO,
        *,
        source: str,
        allowed: Dict[Tuple[str, str], Any],
        description: Optional[str] = None,
    ):
        super().__init__(stream)
        self.source = source
        self.allowed = allowed
        self.description = description or _METADATA_CONTENT

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise refusal(self.source, f"{module}.{name}", allowed=self.description)
        return self.allowed[(module, name)]

    def persistent_load(self, pid: Any) -> Any:
        raise refusal(self.source, "a persistent id", allowed=self.description)


_METADATA_CONTENT = "torch.distributed.checkpoint metadata classes, torch.Size and dtypes"


def attribute_snapshot(objects: List[Any]) -> List[Tuple[Any, Dict[str, Any]]]:
    return [(obj, dict(vars(obj))) for obj in objects if hasattr(obj, "__dict__")]


def restore_attributes(snapshot: List[Tuple[Any, Dict[str, Any]]]) -> List[str]:
    """Undo attribute changes made to allowed classes (pickle's BUILD opcode applied to a
    class sets class attributes); returns the names of the classes that were changed."""
    changed = []
    for obj, before in snapshot:
        now = vars(obj)
        if now.keys() == before.keys() and all(now[k] is before[k] for k in before):
            continue
        changed.append(getattr(obj, "__qualname__", repr(obj)))
        for key in set(now) - set(before):
            delattr(obj, key)
        for key, value in before.items():
            if now.get(key) is not value:
                setattr(obj, key, value)
    return changed


def load_metadata(stream: BinaryIO, *, source: str) -> Any:
    """Unpickle a ``torch.distributed.checkpoint`` ``.metadata`` file with the allowlist;
    checks that it is a ``Metadata`` whose storage entries name files of its own folder."""
    from torch.distributed.checkpoint.metadata import Metadata

    allowed = allowed_globals()
    snapshot = attribute_snapshot(list(allowed.values()))
    try:
        metadata = RestrictedUnpickler(stream, source=source, allowed=allowed).load()
    except CheckpointFileError:
        raise
    except Exception as exc:  # garbage makes pickle fail in any of a dozen ways
        raise unreadable(source, "torch.distributed.checkpoint metadata file", exc) from None
    finally:
        changed = restore_attributes(snapshot)
    if changed:
        raise refusal(
            source, f"attribute changes to {', '.join(changed)}", allowed=_METADATA_CONTENT
        )
    if not isinstance(metadata, Metadata):
        raise CheckpointFileError(f"{source} holds a {type(metadata).__name__}, not a Metadata")
    _check_storage_paths(metadata, source)
    return metadata


def _check_storage_paths(metadata: Any, source: str) -> None:
    """Each storage entry must name a file of the checkpoint's own folder."""
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or PurePath(name).name != name or name in ("", ".", ".."):
            raise CheckpointFileError(
                f"{source} points outside its folder ({name!r} is not a file name of it)"
            )


_ZIP_MAGIC = b"PK\x03\x04"
_WEIGHTS_ONLY_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_WEIGHTS_ONLY_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", re.S)


def _weights_only_refusal(message: str) -> Optional[str]:
    """What torch's weights_only loader refused, from its message (which also suggests
    retrying with ``weights_only=False``: never shown)."""
    if "Weights only load failed" not in message:
        return None
    found = _WEIGHTS_ONLY_GLOBAL.search(message)
    if found is not None:
        return found.group(1)
    detail = _WEIGHTS_ONLY_DETAIL.search(message)
    return f"content it does not allow ({detail.group(1)[:200] if detail else 'unknown'})"


def _is_zip(stream_or_path: Any) -> bool:
    if isinstance(stream_or_path, (str, PurePath)):
        with open(stream_or_path, "rb") as stream:
            return stream.read(4) == _ZIP_MAGIC
    start = stream_or_path.tell()
    magic = stream_or_path.read(4)
    stream_or_path.seek(start)
    return magic == _ZIP_MAGIC


def load_weights_only(
    stream_or_path: Any, *, source: str, what: str = "torch.save file", legacy: bool = False
) -> Any:
    """``torch.load(..., weights_only=True)`` on the CPU; a refused global or a file that is
    not what torch writes raises ``CheckpointFileError`` naming ``source``. ``legacy``
    also accepts torch's pre-zip format (what ``pickle.dumps`` of a tensor nests)."""
    if not legacy and not _is_zip(stream_or_path):  # torch.save writes zip archives
        raise unreadable(source, what, ValueError("not a zip archive"))
    try:
        return torch.load(stream_or_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        refused = _weights_only_refusal(str(exc))
        if refused is not None:
            allowed = "tensors and plain containers (torch.load weights_only)"
            raise refusal(source, refused, allowed=allowed) from None
        raise unreadable(source, what, exc) from None


def checkpoint_file_error_in(exc: BaseException) -> Optional[CheckpointFileError]:
    """The ``CheckpointFileError`` that torch's ``CheckpointException`` (raised on every
    rank when any rank failed inside a ``torch.distributed.checkpoint`` load) carries, from
    the lowest failing rank; None when it carries none."""
    failures = getattr(exc, "failures", None)
    if not isinstance(failures, dict):
        return None
    for rank in sorted(failures):
        failure = failures[rank]
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointFileError):
            return inner
    return None
