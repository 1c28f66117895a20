"""Turn a failed checkpoint read into one message a user can act on.

``dist_checkpointing.load`` fails with whatever the layer below raised: a
``CheckpointingException`` (``Global shape mismatch ... for key ...``), torch's
``CheckpointException`` (a ``BaseException``, holding each rank's failure), a zip reader's
``RuntimeError`` on damaged bytes. ``load_error`` wraps them in ``CheckpointLoadError`` (a
``ValueError``: the commands exit 2), naming the checkpoint, the original error, cut to a
readable length, and, when the checkpoint was written for another model, the ``model.*``
fields of its ``config.yaml`` that differ from this run's.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from megatron.core.dist_checkpointing.core import CheckpointingException
from torch.distributed.checkpoint.api import CheckpointException

from mm1_megatron.config.messages import cut, short
from mm1_megatron.config.safe_yaml import parse_yaml

# What a damaged, foreign or hostile checkpoint makes the readers raise. Anything else is
# a bug of ours and keeps its traceback.
READ_FAILURES = (
    CheckpointingException,
    CheckpointException,
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    OSError,
    KeyError,
    ValueError,
)
_MAX_MESSAGE = 1500
_MAX_DIFFERENCES = 12


class CheckpointLoadError(ValueError):
    """A checkpoint that exists but cannot be loaded into this model."""


def _flatten(tree: Any, prefix: str) -> Iterator[Tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}.{key}")
    else:
        yield prefix, tree


def saved_config(checkpoint: Path) -> Optional[Dict[str, Any]]:
    """The checkpoint's ``config.yaml`` as a tree, or None when absent or unreadable."""
    path = Path(checkpoint) / "config.yaml"
    try:  # a received checkpoint's YAML: alias expansion bounded, as for configs
        tree = parse_yaml(path.read_text(), str(path))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return tree if isinstance(tree, dict) else None


def model_differences(checkpoint: Path, model_config: Any, section: str = "") -> List[str]:
    """``model.<field>: X in the checkpoint, Y here`` for every ``model.*`` field (under
    ``section``, e.g. ``llm``) of the checkpoint's config that differs from
    ``model_config``."""
    saved = saved_config(checkpoint)
    if saved is None or not isinstance(saved.get("model"), dict):
        return []
    here = dict(_flatten(dataclasses.asdict(model_config), "model"))
    there = dict(_flatten(saved["model"], "model"))
    wanted = f"model.{section}" if section else "model"
    lines = []
    for name in sorted(set(here) | set(there)):
        if not name.startswith(wanted) or here.get(name) == there.get(name):
            continue
        lines.append(
            f"{name}: {short(there.get(name))} in the checkpoint, {short(here.get(name))} here"
        )
    return lines


def _innermost(exc: BaseException) -> BaseException:
    """The error a rank actually hit, out of torch's per-rank ``CheckpointException``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, BaseException):
            return first
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return exc


def load_error(
    exc: BaseException, checkpoint: Path, model_config: Any = None, section: str = ""
) -> ValueError:
    """The ``ValueError`` to raise for ``exc``, raised while reading ``checkpoint``."""
    inner = _innermost(exc)
    if isinstance(inner, ValueError) and not isinstance(inner, KeyError):
        return inner if isinstance(inner, CheckpointLoadError) else CheckpointLoadError(str(inner))
    detail = cut(" ".join(str(inner).split()), _MAX_MESSAGE)
    message = f"cannot load checkpoint {checkpoint}: {type(inner).__name__}: {detail}"
    differences = model_differences(checkpoint, model_config, section) if model_config else []
    if differences:
        shown = differences[:_MAX_DIFFERENCES]
        more = len(differences) - len(shown)
        message += (
            "\nthe checkpoint was written for another model; its config.yaml differs from "
            "this run's in:\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else "")
        )
    return CheckpointLoadError(message)
