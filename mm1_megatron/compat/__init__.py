"""Everything that depends on torch / megatron-core internals, in one place.

See ``README.md`` in this folder for the table of patches: what each replaces, why, for
which versions, and whether it is active on GPU. Code outside this package uses
megatron-core through public names only.
"""

from mm1_megatron.compat.cpu import cpu_execution_enabled, enable_cpu_execution
from mm1_megatron.compat.patching import (
    CompatibilityError,
    Patch,
    active_patches,
    log_active_patches,
    replace_attribute,
)
from mm1_megatron.compat.versions import MCORE_VERSION, check_supported_mcore

__all__ = [
    "CompatibilityError",
    "MCORE_VERSION",
    "Patch",
    "active_patches",
    "check_supported_mcore",
    "cpu_execution_enabled",
    "enable_cpu_execution",
    "log_active_patches",
    "replace_attribute",
]
