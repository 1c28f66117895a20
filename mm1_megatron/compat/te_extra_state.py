"""Transformer Engine's ``_extra_state`` from a checkpoint, checked before TE unpickles it.

TE modules save their FP8 metadata as a ``uint8`` tensor holding ``pickle.dumps`` of a
dict (TE ``module/base.py`` ``get_extra_state``: the recipe object and CPU tensors of
scales and amax histories), and ``set_extra_state`` runs ``pickle.loads`` on those bytes
(the same file, ``set_extra_state``; TE releases after 2.18 refuse unless an environment
variable opts in). Without FP8 the tensor is empty. The tensor itself comes out of the
checkpoint through ``torch.load(weights_only=True)`` (``compat/checkpointing.py``), but its
*contents* would be unpickled by TE with every global allowed: a crafted checkpoint could
run code at ``load_state_dict``.

``check_extra_state`` unpickles the bytes first with an allowlist: the recipe classes of
``transformer_engine.common.recipe`` (dataclasses and enums), dicts, and tensors, whose
storages torch pickles as a nested ``torch.save`` payload (``torch.storage._load_from_bytes``)
that is read here with ``weights_only=True``. If that succeeds, TE's own ``pickle.loads``
of the same bytes can reach nothing else. A refusal raises ``CheckpointFileError`` (a
``ValueError``: exit code 2) naming the checkpoint key.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any, Dict, Tuple

import torch

from mm1_megatron.compat.safe_pickle import (
    CheckpointFileError,
    RestrictedUnpickler,
    attribute_snapshot,
    load_weights_only,
    refusal,
    restore_attributes,
    unreadable,
)

RECIPE_MODULE = "transformer_engine.common.recipe"
_ALLOWED = "Transformer Engine FP8 recipes, dicts and tensors"


def _nested_storage(source: str):
    def load_from_bytes(payload: bytes):
        if not isinstance(payload, (bytes, bytearray)):
            raise refusal(source, "a storage that is not bytes", allowed=_ALLOWED)
        return load_weights_only(
            io.BytesIO(payload), source=source, what="tensor storage", legacy=True
        )

    return load_from_bytes


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (how pickle rebuilds plain class instances) restricted to
    ``object.__new__`` of an allowed class."""
    if base is not object or state is not None:
        raise pickle.UnpicklingError("only object-based reconstruction is allowed")
    return object.__new__(cls)


# megatron-core's own recipe subclass, which TE stores in its FP8 metadata and so pickles
# with every delayed-scaling extra state (0.16.1 ``fp8_utils.py:556``, 0.19.2 ``:734``).
MEGATRON_RECIPES = (("megatron.core.extensions.transformer_engine", "TEDelayedScaling"),)


def _recipe_classes() -> Dict[Tuple[str, str], Any]:
    """The classes ``transformer_engine.common.recipe`` defines (FP8 recipes, formats) and
    megatron-core's subclasses of them."""
    try:
        recipes = importlib.import_module(RECIPE_MODULE)
    except ImportError:  # no TE here: nothing of TE's can be named
        return {}
    found = {
        (RECIPE_MODULE, name): value
        for name, value in vars(recipes).items()
        if isinstance(value, type) and value.__module__ == RECIPE_MODULE
    }
    for module, name in MEGATRON_RECIPES:
        value = getattr(importlib.import_module(module), name, None)
        if isinstance(value, type):
            found[(module, name)] = value
    return found


def _allowed(source: str) -> Dict[Tuple[str, str], Any]:
    return {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _nested_storage(source),
        # megatron-core 0.19 replaces torch's storage reducer with its weights-only twin,
        # so tensors pickled in a process that imported it name this one instead.
        ("megatron.core.safe_globals", "safe_load_from_bytes"): _nested_storage(source),
        ("copyreg", "_reconstructor"): _reconstructor,
        ("builtins", "object"): object,
        **{("torch", n): v for n, v in vars(torch).items() if isinstance(v, torch.dtype)},
        **_recipe_classes(),
    }


def check_extra_state(value: Any, *, source: str) -> None:
    """Refuse an ``_extra_state`` value whose pickled bytes name anything outside the
    allowlist; empty tensors and ``None`` (no FP8 state) pass."""
    if value is None or (isinstance(value, torch.Tensor) and value.numel() == 0):
        return
    if isinstance(value, io.BytesIO):  # TE 1.x format, which TE reads with torch.load
        raise refusal(source, "an io.BytesIO extra state (TE 1.x)", allowed=_ALLOWED)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise CheckpointFileError(
            f"{source}: Transformer Engine extra state must be a uint8 tensor, not "
            f"{type(value).__name__}"
        )
    payload = value.detach().cpu().contiguous().numpy().tobytes()
    allowed = _allowed(source)
    snapshot = attribute_snapshot(list(allowed.values()))
    unpickler = RestrictedUnpickler(
        io.BytesIO(payload), source=source, allowed=allowed, description=_ALLOWED
    )
    try:
        unpickler.load()
    except CheckpointFileError:
        raise
    except Exception as exc:  # garbage makes pickle fail in many ways
        raise unreadable(source, "Transformer Engine extra state", exc) from None
    finally:
        changed = restore_attributes(snapshot)
    if changed:
        raise refusal(source, f"attribute changes to {', '.join(changed)}", allowed=_ALLOWED)
