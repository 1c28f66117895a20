"""Python a dataset ships: Megatron-Energon's ``sample_loader`` and ``part_filter``.

A ``dataset.yaml`` may name ``file.py:function`` in its ``.nv-meta`` folder; energon
imports and runs it. Listing such a dataset runs its code in every training process, so
it happens only when the run allows dataset code (``data.allow_dataset_code: true``), and
only from a regular file inside the dataset's own ``.nv-meta``: a reference that is
absolute, climbs out with ``..``, or reaches a file through a symlink pointing elsewhere
is refused, allowed or not. Refusals are ``ValueError`` naming the file and the flag.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path, PurePosixPath
from typing import Callable

logger = logging.getLogger(__name__)

NV_META = ".nv-meta"
ALLOW_FLAG = "data.allow_dataset_code"


def dataset_code_file(folder: Path, reference: str) -> Path:
    """The file ``reference`` (``file.py[:function]``) names, checked to lie inside
    ``folder/.nv-meta``; ``ValueError`` otherwise."""
    file_name = reference.partition(":")[0]
    meta = Path(folder).resolve() / NV_META
    where = f"{meta / 'dataset.yaml'} names {reference!r}"
    parts = PurePosixPath(file_name.replace("\\", "/")).parts
    if not file_name or PurePosixPath(file_name).is_absolute() or ".." in parts:
        raise ValueError(
            f"{where}: dataset code must be a file inside {meta}, named relative to it "
            "(no absolute path, no '..')"
        )
    path = meta / file_name
    resolved = path.resolve()
    if not resolved.is_relative_to(meta) or not resolved.is_file():
        found = f"it resolves to {resolved}" if resolved != path else "missing or not a file"
        raise ValueError(f"{where}: {path} is not a regular file inside {meta} ({found})")
    return resolved


def load_dataset_function(folder: Path, reference: str, default: str, allowed: bool) -> Callable:
    """``file.py:function`` from ``folder/.nv-meta`` (``default`` when no function is
    named), run only when ``allowed`` (``data.allow_dataset_code``)."""
    path = dataset_code_file(folder, reference)
    name = reference.partition(":")[2] or default
    if not allowed:
        raise ValueError(
            f"{folder}: its .nv-meta/dataset.yaml runs Python from {path} ({default} "
            f"{reference!r}), and dataset code runs only with {ALLOW_FLAG}=true. Set it if "
            "you trust this dataset (its code runs in every training process), or give the "
            "dataset a field_map instead"
        )
    spec = importlib.util.spec_from_file_location(f"energon_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{folder}: cannot import {path} ({default} {reference!r})")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        raise ValueError(f"{folder}: {path} has no function {name!r} ({default} {reference!r})")
    logger.info("energon dataset %s: using its %s %s from %s", folder, default, name, path)
    return getattr(module, name)
