"""``ops.RMSNorm`` and ``ops.LayerNorm``, after TE v2.14 ``ops/basic/rmsnorm.py`` and
``ops/basic/layer_norm.py``: parameter ``weight`` (and ``bias`` for LayerNorm) of
``normalized_shape``; ``zero_centered_gamma`` stores ``gamma - 1`` (initialised to zero)
and computes with ``1 + weight``. The math is done in fp32 and cast back to the input
dtype, as TE's kernels do."""

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from transformer_engine.pytorch.ops.op import BasicOperation
from transformer_engine.pytorch.utils import resolve_device


def _shape(normalized_shape) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


class _Norm(BasicOperation):
    def __init__(self, normalized_shape, eps, device, dtype, zero_centered_gamma, sm_margin):
        super().__init__()
        self.normalized_shape = _shape(normalized_shape)
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self._sm_margins = {"forward": sm_margin, "backward": sm_margin, "inference": sm_margin}
        device = resolve_device("cuda" if device is None else device)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        self.weight = torch.nn.Parameter(
            torch.empty(self.normalized_shape, device=device, dtype=dtype)
        )

    def _gamma(self) -> torch.Tensor:
        weight = self.weight.float()
        return weight + 1 if self.zero_centered_gamma else weight

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(0.0 if self.zero_centered_gamma else 1.0)


class RMSNorm(_Norm):
    """``y = x / sqrt(mean(x^2) + eps) * gamma`` over the last dimensions."""

    def __init__(
        self,
        normalized_shape: Iterable[int] | int,
        *,
        eps: float = 1e-5,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        zero_centered_gamma: bool = False,
        sm_margin: int = 0,
    ) -> None:
        super().__init__(normalized_shape, eps, device, dtype, zero_centered_gamma, sm_margin)
        self.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + self.eps)
        return (y * self._gamma()).to(x.dtype)


class LayerNorm(_Norm):
    """``y = (x - mean) / sqrt(var + eps) * gamma + beta`` over the last dimensions."""

    def __init__(
        self,
        normalized_shape: Iterable[int] | int,
        *,
        eps: float = 1e-5,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        zero_centered_gamma: bool = False,
        sm_margin: int = 0,
    ) -> None:
        super().__init__(normalized_shape, eps, device, dtype, zero_centered_gamma, sm_margin)
        self.bias = torch.nn.Parameter(torch.empty_like(self.weight))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(
            x.float(), self.normalized_shape, self._gamma(), self.bias.float(), self.eps
        )
        return y.to(x.dtype)
