"""Translate our component configs into Megatron-Core ``TransformerConfig`` objects."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config.schema import ModelConfig, ParallelConfig


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's quick GELU, eager: Megatron-Core's ``quick_gelu`` is the same function under
    ``torch.compile``, which on CPU compiles C++ in every new process (seconds each) and
    again for new shapes, for an elementwise op that gains nothing there."""
    return x * torch.sigmoid(1.702 * x)


VISION_ACTIVATION_FUNCS = {"quick_gelu": _quick_gelu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh}


def vision_activation(name: str, fused_kernels: bool):
    """The ViT's activation; Megatron-Core's compiled quick GELU with fused kernels (GPU)."""
    if name == "quick_gelu" and fused_kernels:
        return quick_gelu
    return VISION_ACTIVATION_FUNCS[name]


@dataclass(frozen=True)
class RuntimeOptions:
    """What the machine decides rather than the model: dtype, where weights start, and
    which fused kernels run (they change speed and rounding, not the model)."""

    params_dtype: torch.dtype = torch.float32
    use_cpu_initialization: bool = True
    # SwiGLU, bias-dropout-add and vocab-parallel cross-entropy as fused (jit) kernels.
    fused_kernels: bool = False
    apply_rope_fusion: bool = False  # Transformer Engine's fused RoPE
    # Weight gradients accumulated straight into the fp32 main_grad (needs apex's
    # fused_weight_gradient_mlp_cuda and Megatron's DDP buffers: training only).
    gradient_accumulation_fusion: bool = False
    # The fused cross-entropy's kernel (bf16 runs with fused kernels): Megatron-Core's
    # "native" (an fp32 softmax of [s, b, V/TP] kept for backward). Not Transformer
    # Engine's "te": megatron-core 0.19.2 warns that it "has known stability issues" and
    # Megatron-LM rejects it (model_parallel_config.py:536).
    cross_entropy_fusion_impl: str = "native"


def _shared_kwargs(model: ModelConfig, parallel: ParallelConfig, runtime: RuntimeOptions) -> dict:
    bf16 = runtime.params_dtype == torch.bfloat16
    kwargs = dict(
        tensor_model_parallel_size=parallel.tensor_parallel_size,
        params_dtype=runtime.params_dtype,
        bf16=bf16,
        pipeline_dtype=runtime.params_dtype,
        use_cpu_initialization=runtime.use_cpu_initialization,
        init_method_std=model.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=runtime.fused_kernels,
        # The per-document attention runs torch SDPA (fused softmax inside); Megatron's
        # masked-softmax kernel serves only the dense reference, which never runs fused.
        masked_softmax_fusion=False,
        apply_rope_fusion=runtime.apply_rope_fusion,
        # apex's persistent LayerNorm kernel: left to Megatron-Core's own LayerNorm choice.
        persist_layer_norm=False,
        gradient_accumulation_fusion=runtime.gradient_accumulation_fusion,
        calculate_per_token_loss=True,
    )
    if parallel.recompute != "none":
        kwargs.update(recompute_granularity=parallel.recompute)
        if parallel.recompute == "full":
            kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    return kwargs


def uses_grouped_gemm(model: ModelConfig) -> bool:
    """``moe.grouped_gemm``, defaulting to on exactly when Transformer Engine is the impl.

    ``transformer_impl=auto`` is resolved at the start of training; a config that still
    holds it here (read by conversion or evaluation, which build local layers) gets the
    local experts."""
    setting = model.llm.moe.grouped_gemm
    if setting is None:
        return model.transformer_impl == "transformer_engine"
    return setting


def language_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, runtime: RuntimeOptions
) -> TransformerConfig:
    llm = model.llm
    kwargs = _shared_kwargs(model, parallel, runtime)
    kwargs.update(
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups,
        kv_channels=llm.attention_head_dim,
        qk_layernorm=llm.qk_norm,
        ffn_hidden_size=llm.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=llm.qkv_bias,
        pipeline_model_parallel_size=parallel.pipeline_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # The decoder's sequences are split over the CP group; the ViT's images are not.
        context_parallel_size=parallel.context_parallel_size,
        # Fused SwiGLU (bias-free) and the fused vocab-parallel cross-entropy. The latter
        # returns its logit gradients in bf16 whatever the dtype (megatron-core 0.16-0.19),
        # which would round an fp32 run's gradients (0.16% measured): bf16 runs only.
        bias_activation_fusion=runtime.fused_kernels,
        cross_entropy_loss_fusion=runtime.fused_kernels and runtime.params_dtype == torch.bfloat16,
        cross_entropy_fusion_impl=runtime.cross_entropy_fusion_impl,
    )
    if model.fp8 is not None:
        # The decoder only: FP8 GEMMs need the token count divisible by 8 (16 for the
        # hidden size), which a packed decoder sequence is and a ViT batch is not (730
        # tokens per ViT-H/14-378 image times a varying image count). The ViT and the
        # connector run in bf16.
        kwargs.update(
            fp8=model.fp8, fp8_recipe="delayed" if model.fp8_recipe == "delayed" else "tensorwise"
        )
    if parallel.pipeline_parallel_size > 1:
        kwargs.update(
            num_layers_in_first_pipeline_stage=parallel.num_decoder_layers_on_vision_stage,
            num_layers_in_last_pipeline_stage=parallel.num_decoder_layers_on_last_stage,
        )
        if parallel.context_parallel_size > 1 and model.transformer_impl == "transformer_engine":
            # Transformer Engine's context parallelism pads every document (a THD row
            # whose length varies, batch/document_split.py): stages send each
            # activation's shape first. Megatron-Core refuses that with its default
            # (allgather) token dispatcher even for a dense model; experts set their own.
            kwargs.update(variable_seq_lengths=True, moe_token_dispatcher_type="alltoall")
    moe = llm.moe
    if moe.num_experts > 0:
        kwargs.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_layer_freq=moe.layer_frequency,
            moe_ffn_hidden_size=moe.expert_ffn_hidden_size or llm.ffn_hidden_size,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_z_loss_coeff=moe.z_loss_coeff or None,
            moe_router_load_balancing_type="aux_loss",
            moe_token_dispatcher_type=moe.token_dispatcher,
            expert_model_parallel_size=parallel.expert_parallel_size,
            expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
            moe_router_dtype="fp32",
            # Softmax over the top-k logits is softmax over all, renormalised over the
            # top k; softmax before top-k keeps each expert's share of all experts.
            moe_router_pre_softmax=not moe.renormalizes_top_k,
            moe_grouped_gemm=uses_grouped_gemm(model),
        )
    return TransformerConfig(**kwargs)


def vision_transformer_config(
    model: ModelConfig, parallel: ParallelConfig, runtime: RuntimeOptions
) -> TransformerConfig:
    """The ViT lives whole on the first pipeline stage and is split only by TP.

    Its MLP is never bias-activation fused: Megatron-Core's fused bias-GELU is the tanh
    approximation (a different function from the exact GELU a CLIP ViT is trained with),
    and its quick-GELU fusion exists only for gated units."""
    vision = model.vision
    kwargs = _shared_kwargs(model, parallel, runtime)
    kwargs.update(
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_attention_heads,
        ffn_hidden_size=vision.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=vision.layernorm_epsilon,
        gated_linear_unit=False,
        activation_func=vision_activation(vision.activation, runtime.fused_kernels),
        add_bias_linear=True,
        add_qkv_bias=True,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
    )
    return TransformerConfig(**kwargs)
