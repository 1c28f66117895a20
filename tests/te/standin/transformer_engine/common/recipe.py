"""FP8 recipe classes, after TE v2.14 ``transformer_engine/common/recipe/__init__.py``.

Megatron-Core subclasses ``DelayedScaling`` at import time (``TEDelayedScaling``) and
builds the others when ``fp8_recipe`` asks; they are plain data here (the stand-in never
runs FP8: ``fp8_autocast(enabled=True)`` raises). ``Recipe.delayed()`` etc. are the
classmethods that ``module/base.py`` ``get_extra_state`` consults (recipe/__init__.py:86-125).
"""

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional


class Format(Enum):
    """FP8 formats (recipe/__init__.py:23-45); values are descriptive here."""

    E4M3 = "E4M3"
    E5M2 = "E5M2"
    HYBRID = "HYBRID"


class Recipe:
    """Base class; each predicate says which recipe an instance is (recipe/__init__.py:86)."""

    def nvfp4(self):
        return isinstance(self, NVFP4BlockScaling)

    def mxfp8(self):
        return isinstance(self, MXFP8BlockScaling)

    def delayed(self):
        return isinstance(self, DelayedScaling)

    def float8_current_scaling(self):
        return isinstance(self, Float8CurrentScaling)

    def float8_per_tensor_scaling(self):
        return isinstance(self, (DelayedScaling, Float8CurrentScaling))

    def float8_block_scaling(self):
        return isinstance(self, Float8BlockScaling)

    def custom(self):
        return False


@dataclass
class DelayedScaling(Recipe):
    """recipe/__init__.py:128-216: the v2.14 fields (``override_linear_precision`` is gone
    since 1.8; Megatron-Core passes it only below that version)."""

    margin: int = 0
    fp8_format: Format = Format.HYBRID
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    scaling_factor_compute_algo: Optional[Callable] = None
    reduce_amax: bool = True
    fp8_dpa: bool = False
    fp8_mha: bool = False


@dataclass
class Float8CurrentScaling(Recipe):
    fp8_format: Format = Format.HYBRID


@dataclass
class MXFP8BlockScaling(Recipe):
    margin: int = 0
    fp8_format: Format = Format.E4M3


@dataclass
class Float8BlockScaling(Recipe):
    fp8_format: Format = Format.E4M3


@dataclass
class NVFP4BlockScaling(Recipe):
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
