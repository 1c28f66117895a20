"""Saving the same way on every supported release, and loading without running code from
the checkpoint.

Saving: megatron-core 0.19 added ``async_strategy`` to ``dist_checkpointing.save`` and defaults
it to ``"nvrx"``, the writer of the optional ``nvidia-resiliency-ext`` package; without
that package an asynchronous save raises ``ModuleNotFoundError``. megatron-core's own
writer (``"mcore"``) is what 0.16 always uses, so it is chosen explicitly where the
argument exists (feature detection on the signature).

Loading (``install_safe_loading``, every process, CPU and GPU): the pickled files of a
checkpoint are read through ``safe_pickle``. ``.metadata``: torch's
``FileSystemReader.read_metadata`` (megatron-core's cached reader calls it) uses the
allowlist unpickler. Byte items inside ``.distcp`` files (megatron-core's
``ShardedObject``s: ``_extra_state``, ``dp_reshardable`` optimizer state, 0.19's common
state): torch's ``DefaultLoadPlanner.load_bytes`` loads them with ``weights_only=True``
(torch passes ``False``). ``common.pt`` (0.16, and 0.19's legacy checkpoints): read with
``weights_only=True`` explicitly (megatron-core omits it; torch >= 2.6 defaults to it).
Inside a ``torch.distributed.checkpoint`` load any error reaches the caller as torch's
``CheckpointException``, a ``BaseException`` raised on every rank, and torch 2.13 turns a
failed ``.metadata`` read into an ``AssertionError`` message; so ``dist_checkpointing.load``
reads ``.metadata`` itself first and re-raises the ``CheckpointFileError`` (a ``ValueError``
naming the file) a ``CheckpointException`` carries.
"""

from __future__ import annotations

import inspect
import weakref
from pathlib import Path
from typing import Any, Callable, Dict

from megatron.core import dist_checkpointing

from mm1_megatron.compat.patching import replace_attribute, require_attribute
from mm1_megatron.compat.safe_pickle import (
    checkpoint_file_error_in,
    load_metadata,
    load_weights_only,
)

_TORCH = "torch 2.10-2.13 (torch.distributed.checkpoint)"
_MCORE = "megatron-core 0.16.1-0.19.2"
_state = {"safe_loading": False}
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's global metadata
_metadata_folders: Dict[int, str] = {}  # id(Metadata) -> the folder it was read from

_SAVE_TAKES_ASYNC_STRATEGY = (
    "async_strategy" in inspect.signature(dist_checkpointing.save).parameters
)


def save_sharded(sharded_state_dict, checkpoint_dir: str, *, async_save: bool):
    """``dist_checkpointing.save``; returns the async request when ``async_save``."""
    kwargs = {"async_sharded_save": async_save}
    if async_save and _SAVE_TAKES_ASYNC_STRATEGY:
        kwargs["async_strategy"] = "mcore"
    return dist_checkpointing.save(sharded_state_dict, checkpoint_dir, **kwargs)


def install_safe_loading() -> None:
    """Route every read of a checkpoint's pickled files through ``safe_pickle``.
    Idempotent; raises ``CompatibilityError`` at start-up when a target is gone."""
    if _state["safe_loading"]:
        return
    from torch.distributed.checkpoint import default_planner, filesystem

    _patch_read_metadata(filesystem)
    _patch_load_bytes(default_planner)
    _patch_common_pt()
    replace_attribute(
        dist_checkpointing,
        "load",
        _reporting_refusals(dist_checkpointing.load),
        reason="a refused or unreadable checkpoint file reaches the caller as a ValueError "
        "naming it, not wrapped in torch's CheckpointException (a BaseException)",
        written_for=_MCORE,
    )
    _state["safe_loading"] = True


def _patch_read_metadata(filesystem) -> None:
    from torch.distributed.checkpoint.metadata import StorageMeta

    reader = filesystem.FileSystemReader
    require_attribute(
        reader, "_get_metadata_path", reason="reading .metadata safely", written_for=_TORCH
    )

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = load_metadata(stream, source=str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        _metadata_folders[id(metadata)] = str(self.path)
        weakref.finalize(metadata, _metadata_folders.pop, id(metadata), None)
        return metadata

    replace_attribute(
        reader,
        "read_metadata",
        read_metadata,
        reason="it unpickles .metadata with pickle.load (any callable could run); "
        "replaced by an allowlist of the metadata classes (compat/safe_pickle.py)",
        written_for=_TORCH,
    )


def _byte_item_source(planner, read_item) -> str:
    metadata = getattr(planner, "metadata", None)
    storage = getattr(metadata, "storage_data", None) or {}
    info = storage.get(read_item.storage_index)
    folder = _metadata_folders.get(id(metadata), "<checkpoint>")
    where = f"{folder}/{info.relative_path}" if info is not None else folder
    return f"{where} (item {read_item.dest_index.fqn})"


def _patch_load_bytes(default_planner) -> None:
    set_element = require_attribute(
        default_planner, "set_element", reason="loading byte items", written_for=_TORCH
    )

    def load_bytes(self, read_item, value) -> None:
        source = _byte_item_source(self, read_item)
        loaded = load_weights_only(value, source=source, what="byte item (torch.save data)")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    replace_attribute(
        default_planner.DefaultLoadPlanner,
        "load_bytes",
        load_bytes,
        reason="it loads byte items (megatron-core's ShardedObjects) with "
        "torch.load(weights_only=False)",
        written_for=_TORCH,
    )


def _load_common_pt(checkpoint_dir, megatrons_own: Callable[[], Any]) -> Any:
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = Path(checkpoint_dir) / COMMON_STATE_FNAME
    if not path.is_file():  # missing, or not on a local file system: megatron-core's code
        return megatrons_own()
    return load_weights_only(path, source=str(path), what="torch.save file")


def _patch_common_pt() -> None:
    from megatron.core.dist_checkpointing.strategies import common

    reason = "common.pt is read with torch.load without weights_only (safe only by torch's default)"
    if hasattr(common, "TorchCommonLoadStrategy"):  # 0.16: a strategy method
        strategy = common.TorchCommonLoadStrategy
        original = strategy.load_common

        def load_common_method(self, checkpoint_dir):
            return _load_common_pt(checkpoint_dir, lambda: original(self, checkpoint_dir))

        replace_attribute(
            strategy,
            "load_common",
            load_common_method,
            reason=reason,
            written_for="megatron-core 0.16.1",
        )
        return
    from megatron.core.dist_checkpointing import serialization  # 0.19: legacy common.pt

    original_function = serialization.load_common

    def load_common(checkpoint_dir):
        return _load_common_pt(checkpoint_dir, lambda: original_function(checkpoint_dir))

    replace_attribute(
        serialization,
        "load_common",
        load_common,
        reason=reason,
        written_for="megatron-core 0.19.2",
    )


def _reporting_refusals(load: Callable[..., Any]) -> Callable[..., Any]:
    """``load`` that reads ``.metadata`` first (torch's own read happens inside its load,
    which turns a failure into an ``AssertionError`` message after trying per-rank
    metadata), and re-raises a ``CheckpointFileError`` from inside torch's load as itself."""
    from torch.distributed.checkpoint import CheckpointException

    signature = inspect.signature(load)

    def load_with_refusals_reported(*args: Any, **kwargs: Any) -> Any:
        checkpoint_dir = signature.bind(*args, **kwargs).arguments.get("checkpoint_dir")
        metadata_path = Path(str(checkpoint_dir)) / METADATA_FILE
        if metadata_path.is_file():
            with open(metadata_path, "rb") as stream:
                load_metadata(stream, source=str(metadata_path))
        try:
            return load(*args, **kwargs)
        except CheckpointException as exc:
            refused = checkpoint_file_error_in(exc)
            if refused is None:
                raise
            raise refused.with_traceback(None) from None

    load_with_refusals_reported.__doc__ = load.__doc__
    return load_with_refusals_reported
