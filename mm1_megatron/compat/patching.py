"""The one way this project replaces an attribute of torch or megatron-core.

Every replacement names what it patches, why, and the versions it was written for. When
the target no longer exists (a newer release renamed or removed it), ``replace_attribute``
raises ``CompatibilityError`` at start-up with that name and those versions, instead of
creating a new attribute nobody reads, which is how a renamed private function would
otherwise be "patched" silently.

The registry of applied patches is what ``log_active_patches`` prints once per process
and what ``docs``/tests read to know which patches are live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

logger = logging.getLogger(__name__)


class CompatibilityError(RuntimeError):
    """A patch's target is missing from the installed torch / megatron-core."""


@dataclass(frozen=True)
class Patch:
    target: str  # dotted name of the replaced attribute
    reason: str  # one line: why the project needs it
    written_for: str  # the versions the replacement was written against
    scope: str  # "cpu" (only without CUDA) or "all"


_applied: Dict[str, Patch] = {}
_originals: Dict[str, Any] = {}
_logged = {"done": False}


def installed_versions() -> str:
    """``torch X, megatron-core Y`` of this process, for error messages."""
    import torch

    try:
        import megatron.core as mcore

        mcore_version = mcore.__version__
    except ImportError:  # pragma: no cover - megatron-core is a dependency
        mcore_version = "not installed"
    return f"torch {torch.__version__}, megatron-core {mcore_version}"


def _owner_name(owner: Any) -> str:
    return (
        getattr(owner, "__qualname__", None)
        if isinstance(owner, type)
        else getattr(owner, "__name__", type(owner).__name__)
    )


def _full_name(owner: Any, attribute: str) -> str:
    module = getattr(owner, "__module__", None) if isinstance(owner, type) else None
    prefix = f"{module}." if module else ""
    return f"{prefix}{_owner_name(owner)}.{attribute}"


def replace_attribute(
    owner: Any,
    attribute: str,
    replacement: Any,
    *,
    reason: str,
    written_for: str,
    scope: str = "all",
) -> Any:
    """Set ``owner.attribute = replacement`` and return the original.

    Raises ``CompatibilityError`` when ``owner`` has no ``attribute``: the replacement
    was written for another release and must be revisited, not applied blindly.
    Replacing the same target twice is an error too (patches are installed once).
    """
    assert scope in ("cpu", "all"), scope
    name = _full_name(owner, attribute)
    if not hasattr(owner, attribute):
        raise CompatibilityError(
            f"cannot patch {name}: it does not exist in the installed {installed_versions()}. "
            f"The patch ({reason}) was written for {written_for}; update "
            "mm1_megatron/compat for this release"
        )
    if name in _applied:
        raise CompatibilityError(f"{name} is already patched ({_applied[name].reason})")
    original = getattr(owner, attribute)
    setattr(owner, attribute, replacement)
    _applied[name] = Patch(name, reason, written_for, scope)
    _originals[name] = original
    return original


def require_attribute(owner: Any, attribute: str, *, reason: str, written_for: str) -> Any:
    """Read an internal the project depends on, failing like ``replace_attribute`` when
    the installed release lacks it."""
    if not hasattr(owner, attribute):
        raise CompatibilityError(
            f"{_full_name(owner, attribute)} does not exist in the installed "
            f"{installed_versions()}; it is needed for {reason} (written for {written_for})"
        )
    return getattr(owner, attribute)


def define_missing(
    owner: Any, attribute: str, value: Any, *, reason: str, written_for: str
) -> bool:
    """Define ``owner.attribute`` where a release references it without defining it.

    Feature detection: nothing happens when the attribute exists (the bug is fixed).
    Returns True when the definition was added.
    """
    if hasattr(owner, attribute):
        return False
    setattr(owner, attribute, value)
    name = _full_name(owner, attribute)
    _applied[name] = Patch(name, reason, written_for, "all")
    return True


def register_patch(target: str, *, reason: str, written_for: str, scope: str = "all") -> None:
    """Record a patch applied by other means (a subclass, a function mode) for the log."""
    _applied.setdefault(target, Patch(target, reason, written_for, scope))


def original(target: str) -> Optional[Any]:
    """The attribute a patch replaced (``None`` if ``target`` is not patched)."""
    return _originals.get(target)


def active_patches() -> List[Patch]:
    return list(_applied.values())


def log_active_patches(log: Callable[..., None] = logger.info) -> None:
    """Log the live patches once per process (start-up)."""
    if _logged["done"]:
        return
    _logged["done"] = True
    patches = active_patches()
    if not patches:
        log("compat: no torch/megatron-core patches active (%s)", installed_versions())
        return
    log(
        "compat: %d torch/megatron-core patches active (%s): %s",
        len(patches),
        installed_versions(),
        ", ".join(p.target for p in patches),
    )
