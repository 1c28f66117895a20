"""``te.pytorch.LayerNormLinear`` on CPU, after TE v2.14 ``module/layernorm_linear.py``.

Constructor: the v2.14 keyword list (layernorm_linear.py:1131-1163); ``normalization``
is "LayerNorm" or "RMSNorm". Parameters, in TE's registration order
(layernorm_linear.py:1258-1380): ``layer_norm_weight`` (ones, or zeros with
``zero_centered_gamma``), ``layer_norm_bias`` (LayerNorm only; ``None`` for RMSNorm), then
``weight`` and ``bias`` as in ``Linear``. ``forward`` returns ``out``, ``(out, bias)``,
``(out, ln_out)`` or ``(out, bias, ln_out)`` (layernorm_linear.py:1714-1720); with a
sequence-parallel column layer the norm runs on the local shard and its output is
all-gathered before the GEMM (``return_layernorm_output_gathered`` returns that one).
"""

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from transformer_engine.pytorch.module import _common as common
from transformer_engine.pytorch.module.base import check_unsupported
from transformer_engine.pytorch.module.linear import Linear


def _constant(value: float):
    def init(tensor: torch.Tensor) -> None:
        tensor.fill_(value)

    return init


class LayerNormLinear(Linear):
    """A norm (RMSNorm or LayerNorm) fused in front of TE's ``Linear``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        eps: float = 1e-5,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group=None,
        tp_size: int = 1,
        get_rng_state_tracker: Optional[Callable] = None,
        init_method: Optional[Callable] = None,
        bias: bool = True,
        normalization: str = "LayerNorm",
        return_bias: bool = False,
        params_dtype: Optional[torch.dtype] = None,
        parallel_mode: Optional[str] = None,
        return_layernorm_output: bool = False,
        return_layernorm_output_gathered: bool = False,
        parameters_split=None,
        zero_centered_gamma: bool = False,
        device="cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_name: Optional[str] = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        if normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError("Unsupported normalization type!")
        self.normalization = normalization
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output_gathered
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self._norm_args = (in_features, dtype, common.resolve_device(device))
        super().__init__(
            in_features, out_features, sequence_parallel=sequence_parallel,
            fuse_wgrad_accumulation=fuse_wgrad_accumulation, tp_group=tp_group,
            tp_size=tp_size, get_rng_state_tracker=get_rng_state_tracker,
            init_method=init_method, bias=bias, return_bias=return_bias,
            params_dtype=params_dtype, parallel_mode=parallel_mode,
            parameters_split=parameters_split, device=device, ub_overlap_ag=ub_overlap_ag,
            ub_overlap_rs=ub_overlap_rs, ub_overlap_rs_dgrad=ub_overlap_rs_dgrad,
            ub_bulk_wgrad=ub_bulk_wgrad, ub_bulk_dgrad=ub_bulk_dgrad, ub_name=ub_name,
            delay_wgrad_compute=delay_wgrad_compute, symmetric_ar_type=symmetric_ar_type,
            name=name,
        )  # fmt: skip

    def build_linear_parameters(self, init_method, dtype, device) -> None:
        in_features, dtype, device = self._norm_args
        gamma = float(not self.zero_centered_gamma)
        self.register_parameter(
            "layer_norm_weight",
            torch.nn.Parameter(torch.empty(in_features, device=device, dtype=dtype)),
            init_fn=_constant(gamma),
        )
        if self.normalization != "RMSNorm":
            self.register_parameter(
                "layer_norm_bias",
                torch.nn.Parameter(torch.empty(in_features, device=device, dtype=dtype)),
                init_fn=_constant(0.0),
            )
        else:
            self.layer_norm_bias = None
        super().build_linear_parameters(init_method, dtype, device)

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        super().reset_parameters(defer_init=defer_init)
        if not defer_init:
            self.layer_norm_weight.sequence_parallel = self.sequence_parallel
            if self.layer_norm_bias is not None:
                self.layer_norm_bias.sequence_parallel = self.sequence_parallel

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.layer_norm_weight.float()
        gamma = gamma + 1 if self.zero_centered_gamma else gamma
        xf = x.float()
        if self.normalization == "RMSNorm":
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * gamma
        else:
            bias = self.layer_norm_bias.float()
            y = F.layer_norm(xf, (xf.shape[-1],), gamma, bias, self.eps)
        return y.to(x.dtype)

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        check_unsupported("LayerNormLinear.forward", fp8_output=fp8_output, fp8_grad=fp8_grad)
        self.activation_dtype = inp.dtype
        ln_out = self._norm(inp)
        ln_total = common.gather_input(self, ln_out)
        result = common.linear_with_bias(self, ln_total, self.weight, self.bias)
        if not self.return_layernorm_output:
            return result
        # Without sequence parallelism the "gathered" output is the local one; returning it
        # from before the column-parallel dgrad all-reduce keeps its gradient unreduced.
        gathered = self.return_layernorm_output_gathered and self.sequence_parallel
        ln_return = ln_total if gathered else ln_out
        if self.return_bias:
            return result[0], result[1], ln_return
        return result, ln_return
