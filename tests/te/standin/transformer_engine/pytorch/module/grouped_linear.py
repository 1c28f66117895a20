"""``te.pytorch.GroupedLinear`` on CPU, after TE v2.14 ``module/grouped_linear.py``.

``num_gemms`` independent linear layers applied to consecutive row blocks of the input:
``forward(inp, m_splits, is_first_microbatch=None)`` splits ``inp`` along dim 0 by
``m_splits`` and runs block ``i`` through ``weight{i}`` / ``bias{i}``. Parameter names are
TE's default per-GEMM layout (grouped_linear.py:706-736; ``single_grouped_weight`` /
``single_grouped_bias`` are refused). TE does no tensor-parallel communication in this
module (Megatron-Core's token dispatcher does it), so ``parallel_mode`` only shapes the
weights (grouped_linear.py:697-702) and sets their parallel attributes (:850-885).
Returns ``out``, or ``(out, [bias_i...])`` with ``return_bias`` (:1091-1093).
"""

from typing import Callable, List, Optional

import torch

from transformer_engine.pytorch.module import _common as common
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule, check_unsupported


def _zero(tensor: torch.Tensor) -> None:
    tensor.zero_()


class GroupedLinear(TransformerEngineBaseModule):
    """``num_gemms`` linear layers over the row blocks given by ``m_splits``."""

    def __init__(
        self,
        num_gemms: int,
        in_features: int,
        out_features: int,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group=None,
        tp_size: int = 1,
        get_rng_state_tracker: Optional[Callable] = None,
        rng_tracker_name: Optional[str] = None,
        init_method: Optional[Callable] = None,
        bias: bool = True,
        return_bias: bool = False,
        params_dtype: Optional[torch.dtype] = None,
        parallel_mode: Optional[str] = None,
        device="cuda",
        ub_overlap_rs: bool = False,
        ub_overlap_ag: bool = False,
        ub_name: Optional[str] = None,
        delay_wgrad_compute: bool = False,
        save_original_input: bool = False,
        single_grouped_weight: bool = False,
        single_grouped_bias: bool = False,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name)
        check_unsupported(
            "GroupedLinear",
            fuse_wgrad_accumulation=fuse_wgrad_accumulation,
            ub_overlap_rs=ub_overlap_rs,
            ub_overlap_ag=ub_overlap_ag,
            delay_wgrad_compute=delay_wgrad_compute,
            single_grouped_weight=single_grouped_weight,
            single_grouped_bias=single_grouped_bias,
        )
        if parallel_mode not in common.PARALLEL_MODES:
            raise AssertionError(f"parallel_mode {parallel_mode!r} not supported.")
        self.num_gemms = num_gemms
        self.use_bias = bias
        self.return_bias = return_bias
        self.apply_bias = bias and not return_bias
        self.get_rng_state_tracker = get_rng_state_tracker
        self.rng_tracker_name = rng_tracker_name
        self.set_tensor_parallel_group(tp_group)
        self.tp_size = tp_size
        self.parallel_mode = parallel_mode
        self.in_features, self.out_features = in_features, out_features
        if parallel_mode == "column":
            self.out_features = common.partition(out_features, tp_size, "out_features")
        elif parallel_mode == "row":
            self.in_features = common.partition(in_features, tp_size, "in_features")
        self.sequence_parallel = (tp_size > 1) and sequence_parallel
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        device = common.resolve_device(device)
        self._build_parameters(init_method, dtype, device)
        self.reset_parameters(defer_init=device.type == "meta")

    def _build_parameters(self, init_method, dtype, device) -> None:
        shape = (self.out_features, self.in_features)
        for i in range(self.num_gemms):
            self.register_parameter(
                f"weight{i}",
                torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype)),
                init_fn=init_method,
                get_rng_state_tracker=self.get_rng_state_tracker,
            )
        for i in range(self.num_gemms):
            if self.use_bias:
                bias = torch.empty(self.out_features, device=device, dtype=dtype)
                self.register_parameter(f"bias{i}", torch.nn.Parameter(bias), init_fn=_zero)
            else:
                setattr(self, f"bias{i}", common.empty_bias(dtype, device))

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        super().reset_parameters(defer_init=defer_init)
        if defer_init:
            return
        for i in range(self.num_gemms):
            common.set_tp_attributes(
                getattr(self, f"weight{i}"), 1 if self.parallel_mode == "row" else 0
            )
            if self.use_bias and self.parallel_mode == "row":
                getattr(self, f"bias{i}").sequence_parallel = self.sequence_parallel
            elif self.use_bias and self.parallel_mode == "column":
                common.set_tp_attributes(getattr(self, f"bias{i}"), 0)

    def forward(self, inp: torch.Tensor, m_splits: List[int], is_first_microbatch=None):
        if len(m_splits) != self.num_gemms:
            raise AssertionError("Number of splits should match number of GEMMs.")
        self.activation_dtype = inp.dtype
        blocks = torch.split(inp.reshape(-1, inp.shape[-1]), list(m_splits))
        outs = []
        for i, block in enumerate(blocks):
            out = torch.nn.functional.linear(block, getattr(self, f"weight{i}").to(inp.dtype))
            if self.apply_bias:
                out = out + getattr(self, f"bias{i}").to(out.dtype)
            outs.append(out)
        out = torch.cat(outs).view(*inp.shape[:-1], self.out_features)
        if self.return_bias:
            return out, [getattr(self, f"bias{i}") for i in range(self.num_gemms)]
        return out
