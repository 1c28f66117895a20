"""``transformer_engine.pytorch.Linear`` on CPU, after TE v2.14 ``module/linear.py``.

Constructor: the v2.14 keyword list (linear.py:1072-1098); options the stand-in cannot
compute (userbuffers, fused wgrad accumulation, delayed wgrad, symmetric all-reduce,
split parameters) raise ``NotImplementedError``. Parameters ``weight`` ``[out/tp, in]``
(column) or ``[out, in/tp]`` (row) and ``bias`` (linear.py:1245-1287), with TE's tensor-
parallel attributes (linear.py:1321-1340). ``forward(inp, is_first_microbatch=None,
fp8_output=False, fp8_grad=False)`` returns ``out``, or ``(out, bias)`` with
``return_bias`` (linear.py:1473-1475).
"""

from typing import Callable, Optional

import torch

from transformer_engine.pytorch.module import _common as common
from transformer_engine.pytorch.module.base import TransformerEngineBaseModule, check_unsupported


def _zero(tensor: torch.Tensor) -> None:
    tensor.zero_()


class Linear(TransformerEngineBaseModule):
    """TE's linear layer: ``y = x W^T + b`` with optional column/row tensor parallelism."""

    def __init__(
        self,
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
        parameters_split=None,
        device="cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_name: Optional[str] = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: Optional[str] = None,
        save_original_input: bool = False,
        name: Optional[str] = None,
    ) -> None:
        super().__init__(name)
        check_unsupported(
            "Linear",
            fuse_wgrad_accumulation=fuse_wgrad_accumulation,
            parameters_split=parameters_split,
            ub_overlap_ag=ub_overlap_ag,
            ub_overlap_rs=ub_overlap_rs,
            ub_overlap_rs_dgrad=ub_overlap_rs_dgrad,
            ub_bulk_dgrad=ub_bulk_dgrad,
            ub_bulk_wgrad=ub_bulk_wgrad,
            delay_wgrad_compute=delay_wgrad_compute,
            symmetric_ar_type=symmetric_ar_type,
        )
        if parallel_mode not in common.PARALLEL_MODES:
            raise AssertionError(f"parallel_mode {parallel_mode!r} not supported")
        self.init_linear_state(
            in_features,
            out_features,
            sequence_parallel,
            tp_group,
            tp_size,
            bias,
            return_bias,
            parallel_mode,
            get_rng_state_tracker,
            rng_tracker_name,
        )
        dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        device = common.resolve_device(device)
        self.build_linear_parameters(init_method, dtype, device)
        self.reset_parameters(defer_init=device.type == "meta")

    def init_linear_state(
        self,
        in_features,
        out_features,
        sequence_parallel,
        tp_group,
        tp_size,
        bias,
        return_bias,
        parallel_mode,
        get_rng_state_tracker,
        rng_tracker_name,
    ) -> None:
        """Attributes TE sets in linear.py:1100-1150 and Megatron-Core reads back."""
        self.use_bias = bias
        self.return_bias = return_bias
        self.apply_bias = bias and not return_bias
        self.get_rng_state_tracker = get_rng_state_tracker
        self.rng_tracker_name = rng_tracker_name
        self.parallel_mode = parallel_mode
        self.sequence_parallel = (tp_size > 1) and sequence_parallel
        self.set_tensor_parallel_group(tp_group)
        self.tp_size = tp_size
        self.in_features = in_features
        self.out_features = out_features
        if parallel_mode == "column":
            self.out_features = common.partition(out_features, tp_size, "out_features")
        elif parallel_mode == "row":
            self.in_features = common.partition(in_features, tp_size, "in_features")

    def build_linear_parameters(self, init_method, dtype, device) -> None:
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        self.register_parameter(
            "weight",
            torch.nn.Parameter(weight),
            init_fn=init_method,
            get_rng_state_tracker=self.get_rng_state_tracker,
            fp8_meta_index=0,
        )
        if self.use_bias:
            bias = torch.empty(self.out_features, dtype=dtype, device=device)
            self.register_parameter("bias", torch.nn.Parameter(bias), init_fn=_zero)
        else:
            self.bias = common.empty_bias(dtype, device)

    def reset_parameters(self, defer_init: Optional[bool] = False) -> None:
        """linear.py:1321-1340: TE's parallel attributes on weight and bias."""
        super().reset_parameters(defer_init=defer_init)
        if defer_init:
            return
        common.set_tp_attributes(self.weight, 1 if self.parallel_mode == "row" else 0)
        if self.use_bias:
            if self.parallel_mode == "row":
                self.bias.sequence_parallel = self.sequence_parallel
            elif self.parallel_mode == "column":
                common.set_tp_attributes(self.bias, 0)

    def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        check_unsupported("Linear.forward", fp8_output=fp8_output, fp8_grad=fp8_grad)
        self.activation_dtype = inp.dtype
        x = common.gather_input(self, inp)
        return common.linear_with_bias(self, x, self.weight, self.bias)
