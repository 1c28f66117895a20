"""``te.pytorch.RMSNorm`` / ``te.pytorch.LayerNorm``: the module-level norms Megatron-Core's
``TENorm.__new__`` instantiates, after TE v2.14 ``module/rmsnorm.py`` and
``module/layernorm.py``. Since TE 2.2 they are subclasses of the fusible ops (so they have
the ops' ``_extra_state``, ``ops/op.py:528``), accept the legacy ``sequence_parallel``,
deprecated ``params_dtype``/``hidden_size`` keywords (rmsnorm.py:63-105) and mark
``weight.sequence_parallel`` for Megatron's gradient all-reduce (rmsnorm.py:140-142).
"""

import warnings
from typing import Iterable, Optional, Union

from transformer_engine.pytorch.ops import norms


def _legacy_kwargs(normalized_shape, hidden_size, params_dtype, kwargs):
    if normalized_shape is None:
        if hidden_size is None:
            raise RuntimeError(
                "Neither `normalized_shape` nor `hidden_size` (deprecated) args are provided"
            )
        warnings.warn(
            "`hidden_size` arg has been renamed to `normalized_shape`",
            DeprecationWarning,
            stacklevel=3,
        )
        normalized_shape = hidden_size
    elif hidden_size is not None:
        raise RuntimeError(
            "Both `normalized_shape` and `hidden_size` (deprecated) args are provided"
        )
    if params_dtype is not None:
        if "dtype" in kwargs:
            raise RuntimeError("Both `dtype` and `params_dtype` (deprecated) kwargs are provided")
        kwargs["dtype"] = params_dtype
    return normalized_shape


class _MegatronFlags:
    """The Megatron-LM integration of rmsnorm.py:63-142 / layernorm.py (same signature):
    the legacy keywords, then ``weight.sequence_parallel`` marked."""

    def __init__(
        self,
        normalized_shape: Union[Iterable[int], int, None] = None,
        eps: float = 1e-5,
        sequence_parallel: Optional[bool] = None,
        params_dtype=None,
        zero_centered_gamma: bool = False,
        hidden_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        shape = _legacy_kwargs(normalized_shape, hidden_size, params_dtype, kwargs)
        self.sequence_parallel = sequence_parallel
        super().__init__(shape, eps=eps, zero_centered_gamma=zero_centered_gamma, **kwargs)
        self._mark_sequence_parallel()

    def _mark_sequence_parallel(self) -> None:
        if self.sequence_parallel is not None:
            self.weight.sequence_parallel = self.sequence_parallel
            if getattr(self, "bias", None) is not None:
                self.bias.sequence_parallel = self.sequence_parallel

    def fast_setattr(self, name, value) -> None:
        self.__dict__[name] = value


class RMSNorm(_MegatronFlags, norms.RMSNorm):
    """``te.pytorch.RMSNorm`` (module/rmsnorm.py)."""


class LayerNorm(_MegatronFlags, norms.LayerNorm):
    """``te.pytorch.LayerNorm`` (module/layernorm.py)."""
