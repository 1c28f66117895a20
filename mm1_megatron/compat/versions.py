"""Installed torch / megatron-core versions and the range this project supports.

Version checks are for differences that cannot be detected by feature (for example a
changed meaning with an unchanged name). Prefer feature detection where it is exact.
"""

from __future__ import annotations

import logging

import megatron.core
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

logger = logging.getLogger(__name__)

# Exactly what CI tests (.ci/run): 0.16.1 on Python 3.11 and the newest 0.19.x on
# Python 3.12; 0.17, 0.18 and 0.19.0 are untested and excluded. setup.py repeats this
# string (a test keeps them equal).
MCORE_REQUIREMENT = "megatron-core>=0.16.1,<0.20,!=0.17.*,!=0.18.*,!=0.19.0"
MCORE_SPECIFIER = SpecifierSet(MCORE_REQUIREMENT[len("megatron-core") :])

MCORE_VERSION = Version(megatron.core.__version__)
TORCH_VERSION = Version(torch.__version__.split("+")[0])


def mcore_at_least(version: str) -> bool:
    return MCORE_VERSION >= Version(version)


def check_supported_mcore() -> bool:
    """Warn when the installed megatron-core is outside the tested range."""
    if MCORE_VERSION in MCORE_SPECIFIER:
        return True
    logger.warning(
        "megatron-core %s is installed, which mm1_megatron does not test "
        "(supported: %s); pin a supported release with pip install '%s'",
        MCORE_VERSION,
        MCORE_REQUIREMENT,
        MCORE_REQUIREMENT,
    )
    return False
