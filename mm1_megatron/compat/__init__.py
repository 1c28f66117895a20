"""Everything that depends on torch / megatron-core internals, in one place.

See ``README.md`` in this folder for the table of patches: what each replaces, why, for
which versions, and whether it is active on GPU. Code outside this package uses
megatron-core through public names only.

Importing this package imports neither torch nor megatron-core (``import mm1_megatron``
installs ``deferred_compile`` before megatron-core can load, and ``mm1 --help`` stays
fast); the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CompatibilityError": "patching",
    "Patch": "patching",
    "active_patches": "patching",
    "log_active_patches": "patching",
    "replace_attribute": "patching",
    "cpu_execution_enabled": "cpu",
    "enable_cpu_execution": "cpu",
    "MCORE_VERSION": "versions",
    "check_supported_mcore": "versions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
    return getattr(module, name)
