"""Megatron-Core's linear and transformer layers called directly while generating.

A CPU decode step of a small model spends more time in Megatron-Core's Python around the
arithmetic than in the arithmetic: at TP=1 without gradients ``ColumnParallelLinear`` /
``RowParallelLinear`` run ``matmul(input, weight.t())`` (+ bias) through three autograd
functions (copy to and reduce from the tensor-parallel region, identities at TP=1, and
the linear itself), and ``TransformerLayer`` wraps its norms, attention and MLP in
recompute, offload, CUDA-graph and bias-dropout-add machinery that does nothing in eval.

Inside ``generating()`` (``compat.inference.generation_mode``), layers that need none of
that run the same operations directly: the same submodules, the same matmul and the same
additions in the same order, so the same bits (one exception: a gated MLP skips adding a
GLU offset of 0, which can only turn -0.0 into +0.0). Whether a layer qualifies is decided once
per layer from attributes fixed at construction; any other layer (TP > 1, sequence
parallel, experts, MoE, cross-attention, recompute, offloading, CUDA graphs, Transformer
Engine's fused norms), and every call outside generation, takes Megatron-Core's forward.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from mm1_megatron.compat.patching import CompatibilityError, replace_attribute

WRITTEN_FOR = "megatron-core 0.16.1-0.19.2"

_depth = [0]  # > 0 while generating


@contextlib.contextmanager
def generating():
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def generating_now() -> bool:
    return _depth[0] > 0


def cached(layer, key: str, decide) -> bool:
    """``decide(layer)``, computed on the first call and kept on the layer."""
    value = layer.__dict__.get(key)
    if value is None:
        value = layer.__dict__[key] = bool(decide(layer))
    return value


# --- Linear layers ------------------------------------------------------------------


def _plain_tp1_linear(layer) -> bool:
    config = layer.config
    return (
        layer.tp_group is not None
        and layer.tp_group.size() == 1
        and not layer.sequence_parallel
        and not layer.explicit_expert_comm
        and getattr(layer, "gtp_remat_size", 1) == 1
        and not config.defer_embedding_wgrad_compute
        and config._cpu_offloading_context is None
    )


def _direct_linear(layer) -> bool:
    return (
        _depth[0] > 0
        and not torch.is_grad_enabled()
        and cached(layer, "_mm1_direct_linear", _plain_tp1_linear)
    )


def _linear_output(layer, output):
    """Megatron-Core's ``(output, bias)``: the bias added unless the layer skips it."""
    if layer.skip_bias_add:
        return output, layer.bias
    return (output + layer.bias if layer.bias is not None else output), None


def _column_forward(self, input_, weight=None, runtime_gather_output=None):
    if weight is not None or not _direct_linear(self):
        return _original["column"](self, input_, weight, runtime_gather_output)
    return _linear_output(self, torch.matmul(input_, self.weight.t()))


def _row_forward(self, input_):
    if not _direct_linear(self):
        return _original["row"](self, input_)
    return _linear_output(self, torch.matmul(input_, self.weight.t()))


# --- MLPs ---------------------------------------------------------------------------


def _plain_mlp(mlp) -> bool:
    """The unfused activation path, without clamping."""
    config = mlp.config
    return (
        not getattr(config, "use_te_activation_func", False)
        and not config.bias_activation_fusion
        and getattr(config, "activation_func_clamp_value", None) is None
    )


def _mlp_forward(self, hidden_states, per_token_scale=None, **kwargs):
    direct = (
        _depth[0] > 0
        and per_token_scale is None
        and not torch.is_grad_enabled()
        and cached(self, "_mm1_direct_mlp", _plain_mlp)
    )
    if not direct:
        return _original["mlp"](self, hidden_states, per_token_scale, **kwargs)
    intermediate, bias = self.linear_fc1(hidden_states)
    if bias is not None:
        intermediate = intermediate + bias
    if self.config.gated_linear_unit:
        gate, linear = torch.chunk(intermediate, 2, dim=-1)
        # Megatron-Core adds the offset even when it is 0: a pass over the whole activation
        # (a prefill's largest elementwise one) whose only effect is -0.0 -> +0.0.
        if self.config.glu_linear_offset != 0:
            linear = linear + self.config.glu_linear_offset
        intermediate = self.config.activation_func(gate) * linear
    else:
        intermediate = self.activation_func(intermediate)
    return self.linear_fc2(intermediate)


# --- Transformer layers -------------------------------------------------------------

# What TransformerBlock passes a layer (megatron-core 0.16.1 and 0.19.2 alike).
_LAYER_ARGUMENTS = frozenset(
    (
        "hidden_states",
        "attention_mask",
        "context",
        "context_mask",
        "rotary_pos_emb",
        "rotary_pos_cos",
        "rotary_pos_sin",
        "rotary_pos_cos_sin",
        "attention_bias",
        "inference_context",
        "packed_seq_params",
        "sequence_len_offset",
        "padding_mask",
    )
)
_ATTENTION_ARGUMENTS = (
    "attention_mask",
    "inference_context",
    "rotary_pos_emb",
    "rotary_pos_cos",
    "rotary_pos_sin",
    "rotary_pos_cos_sin",
    "attention_bias",
    "packed_seq_params",
    "sequence_len_offset",
)
_LAYER_MACHINERY = (
    "recompute_input_layernorm",
    "recompute_pre_mlp_layernorm",
    "recompute_mlp",
    "offload_attn_norm",
    "offload_mlp_norm",
    "is_moe_layer",
)
_TORCH_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)


def _plain_layer(layer) -> bool:
    """Pre-norm self-attention and dense MLP with torch norms, eval-time bias-dropout-add
    (a residual addition), and none of the machinery in ``_LAYER_MACHINERY``."""
    config = layer.config
    return (
        isinstance(layer.cross_attention, IdentityOp)
        and isinstance(layer.pre_cross_attn_layernorm, IdentityOp)
        and isinstance(layer.input_layernorm, _TORCH_NORMS)
        and isinstance(layer.pre_mlp_layernorm, _TORCH_NORMS)
        and layer.self_attn_bda is get_bias_dropout_add
        and layer.mlp_bda is get_bias_dropout_add
        and not any(getattr(layer, flag, False) for flag in _LAYER_MACHINERY)
        and not getattr(config, "fp32_residual_connection", False)
        and not getattr(config, "inference_fuse_tp_communication", False)
        and getattr(config, "mlp_chunks_for_prefill", 1) <= 1
        and getattr(config, "cuda_graph_impl", "none") == "none"
        and not getattr(config, "enable_cuda_graph", False)
    )


def _direct_layer(layer, kwargs) -> bool:
    return (
        _depth[0] > 0
        and not layer.training
        and kwargs.get("inference_context") is not None
        and kwargs.get("context") is None
        and kwargs.keys() <= _LAYER_ARGUMENTS
        and cached(layer, "_mm1_direct_layer", _plain_layer)
    )


def _residual_add(output_with_bias, residual):
    """Megatron-Core's bias-dropout-add in eval without gradients: in place,
    ``(x + bias) + residual`` (dropout is the identity)."""
    x, bias = output_with_bias
    if bias is not None:
        x.add_(bias)
    return x.add_(residual)


def _layer_forward(self, *args, **kwargs):
    if args or not _direct_layer(self, kwargs):
        return _original["layer"](self, *args, **kwargs)
    hidden = kwargs["hidden_states"]
    attention = self.self_attention(
        self.input_layernorm(hidden), **{name: kwargs.get(name) for name in _ATTENTION_ARGUMENTS}
    )
    hidden = _residual_add(attention, hidden)
    mlp = self.mlp(self.pre_mlp_layernorm(hidden), padding_mask=kwargs.get("padding_mask"))
    return _residual_add(mlp, hidden), None


# --- Installation -------------------------------------------------------------------

_original = {}


def _check_signatures() -> None:
    expected = {
        ColumnParallelLinear.forward: ["self", "input_", "weight", "runtime_gather_output"],
        RowParallelLinear.forward: ["self", "input_"],
        MLP.forward: ["self", "hidden_states", "per_token_scale", "kwargs"],
    }
    for function, names in expected.items():
        if list(inspect.signature(function).parameters) != names:
            raise CompatibilityError(
                f"{function.__qualname__} no longer takes {names[1:]} (written for "
                f"{WRITTEN_FOR}); update mm1_megatron/compat/inference_layers.py"
            )


def install() -> None:
    """Once per process (``compat.inference`` calls it at import)."""
    if _original:
        return
    _check_signatures()
    reason = "generation at TP=1: the matmul without the tensor-parallel autograd functions"
    for key, cls, replacement in (
        ("column", ColumnParallelLinear, _column_forward),
        ("row", RowParallelLinear, _row_forward),
    ):
        _original[key] = replace_attribute(
            cls, "forward", replacement, reason=reason, written_for=WRITTEN_FOR
        )
    _original["mlp"] = replace_attribute(
        MLP,
        "forward",
        _mlp_forward,
        reason="generation: the unfused MLP without the zero GLU offset pass",
        written_for=WRITTEN_FOR,
    )
    _original["layer"] = replace_attribute(
        TransformerLayer,
        "forward",
        _layer_forward,
        reason="generation: norms, attention, MLP and residual additions without the "
        "training-time machinery around them",
        written_for=WRITTEN_FOR,
    )
