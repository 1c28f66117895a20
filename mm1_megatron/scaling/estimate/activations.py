"""Activation memory: the tensors a forward pass keeps for the backward pass, in bytes.

Every function returns named terms for **one micro-batch** on one rank, so a caller can
print where the memory goes. A transformer layer keeps (per token; ``e`` bytes per value,
``t`` the tensor-parallel size; "outside" terms are divided by ``t`` only with sequence
parallelism, "inside" terms always):

- outside: each norm's input (and, on the composite CPU RMSNorm, its normalised output),
  the QKV and fc1 inputs, the 1-byte dropout masks of a GPT with dropout;
- inside: Q, K, V (the fused QKV output, which stays alive because V is a view of it),
  the rotated copies of Q and K that RoPE makes, the attention probabilities ``[a, s, s]``
  of a non-flash kernel (or the flash kernel's fp32 log-sum-exp per head), the attention
  output (the projection's input; twice where a reshape copies it), fc1's output (``2f``
  wide for SwiGLU), the activation's intermediates, fc2's input.

With ``Kernels.korthikanti_gpt`` (LayerNorm, GELU MLP, dropout, no flash, no RoPE) this
is exactly Korthikanti et al. (2022), Table 2: ``sbh(34 + 5as/h)`` per layer.
Selective recomputation drops the core attention's own tensors (probabilities,
log-sum-exp, the kernel's output copy); full recomputation keeps only the layer input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from mm1_megatron.config.schema import ModelConfig

Terms = Dict[str, float]
FP32 = 4


@dataclass(frozen=True)
class Kernels:
    """What the implementation keeps per layer (see the module docstring)."""

    bytes_per_value: int  # 2 (bf16) or 4 (fp32)
    rmsnorm_copies: int  # [tokens, h] tensors an RMSNorm keeps: 1 fused, 2 composite
    rotated_qk_copies: bool  # RoPE writes new Q and K while the fused QKV stays alive
    decoder_scores_kept: bool  # the decoder's attention probabilities are materialised
    vision_scores_kept: bool  # the same for the ViT (Megatron-Core's local attention)
    decoder_output_copies: int  # attention outputs kept per layer: 1, or 2 (per-document)
    swiglu_extra_copies: int  # [tokens, f] tensors besides fc1's output and fc2's input
    gelu_extra_copies: int  # the same for the ViT's activation (eager QuickGELU: 1)
    dropout: bool = False  # GPT-style 1-byte dropout masks (MM1 trains without dropout)
    norm_stats: bool = True  # fp32 mean/rstd per token (Korthikanti leaves them out)
    rope_tables: bool = True  # cos/sin tables RoPE keeps, 4 x [s, d] fp32 per layer
    vision_output_copies: int = 1  # the ViT's attention outputs kept per layer

    @classmethod
    def korthikanti_gpt(cls) -> Kernels:
        """The paper's GPT: 16-bit activations, LayerNorm, GELU, dropout, no flash."""
        return cls(
            bytes_per_value=2,
            rmsnorm_copies=1,
            rotated_qk_copies=False,
            decoder_scores_kept=True,
            vision_scores_kept=True,
            decoder_output_copies=1,
            swiglu_extra_copies=0,
            gelu_extra_copies=0,
            dropout=True,
            norm_stats=False,
            rope_tables=False,
        )


def kernels_for(
    model: ModelConfig, *, device: str, bf16: bool, fused: bool, context_parallel: int = 1
) -> Kernels:
    """The kernels an MM1 run uses on ``device`` (``gpu`` or ``cpu``).

    The CPU path (composite RMSNorm, unfused SwiGLU and QuickGELU) is what
    ``tests/scaling/test_estimate_memory.py`` measures; the GPU paths are read from the
    code (fused RMSNorm, fused SwiGLU, flash attention for the ViT with Transformer Engine)
    and are checked on a GPU by ``tools/check_estimate_memory.py``.

    ``transformer_impl=auto`` is what it resolves to at start: transformer_engine on a GPU
    (assumed installed there, as in the NGC images), local on CPU. Context parallelism
    runs only on the local path (the config check refuses Transformer Engine with it), so
    ``auto`` is estimated as local when ``context_parallel > 1``.
    """
    gpu = device == "gpu"
    impl = model.transformer_impl
    te = impl == "transformer_engine" or (impl == "auto" and gpu and context_parallel == 1)
    return Kernels(
        bytes_per_value=2 if bf16 else 4,
        rmsnorm_copies=1 if gpu else 2,
        rotated_qk_copies=True,
        decoder_scores_kept=model.attention == "dense_mask_reference",
        # The native-resolution ViT attends per image with SDPA, as the decoder does.
        vision_scores_kept=not te and not model.vision.native_resolution,
        # Per-document SDPA concatenates its outputs and reshapes them for the projection;
        # Transformer Engine's packed kernel returns one tensor the projection reads.
        decoder_output_copies=1 if te else 2,
        vision_output_copies=2 if model.vision.native_resolution and not te else 1,
        swiglu_extra_copies=0 if fused else 2,
        gelu_extra_copies=1 if model.vision.activation == "quick_gelu" and not fused else 0,
    )


@dataclass(frozen=True)
class LayerShape:
    """A transformer layer and the tokens it runs on: ``num_sequences`` sequences (or
    images) of ``seq_length`` tokens each."""

    seq_length: int
    num_sequences: int
    hidden: int
    num_heads: int
    num_query_groups: int
    ffn_hidden: int
    gated: bool
    rope: bool
    head_dim: Optional[int] = None  # None: hidden / num_heads
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3)

    @property
    def tokens(self) -> int:
        return self.seq_length * self.num_sequences


def transformer_layer_terms(
    shape: LayerShape,
    k: Kernels,
    *,
    tp: int,
    sp: bool,
    recompute: str,
    scores_kept: bool,
    output_copies: int = 1,
    rmsnorm: bool = False,
    activation_copies: int = 0,
    mlp: bool = True,
) -> Terms:
    """Bytes one layer keeps for one micro-batch on one tensor-parallel rank.

    ``scores_kept``: a non-flash kernel keeps the probabilities; ``output_copies``: how
    many attention outputs a flash kernel path keeps; ``activation_copies``: tensors the
    MLP's activation keeps besides fc1's output and fc2's input; ``mlp=False`` leaves the
    MLP out (an MoE layer's experts are counted by ``moe_terms``)."""
    e, n, h = k.bytes_per_value, shape.tokens, shape.hidden
    outside = n / tp if sp else n  # sequence parallelism splits these
    inside = n / tp
    if recompute == "full":  # Megatron-Core checkpoints the layer input only
        return {"layer_input": e * h * outside}
    head_dim = shape.head_dim or h // shape.num_heads
    heads_width = shape.num_heads * head_dim
    norm_copies = k.rmsnorm_copies if rmsnorm else 1
    stats_per_norm = (1 if rmsnorm else 2) if k.norm_stats else 0
    terms: Terms = {
        "norms": 2 * (norm_copies * e * h + FP32 * stats_per_norm) * outside,
        "qkv_input": e * h * outside,
        "qkv": e * (shape.num_heads + 2 * shape.num_query_groups) * head_dim * inside,
    }
    if shape.qk_norm:  # each head's normalised queries and keys, and their statistics
        qk_heads = shape.num_heads + shape.num_query_groups
        terms["qk_norms"] = (norm_copies * e * head_dim + FP32 * stats_per_norm) * qk_heads * inside
    if shape.rope and k.rotated_qk_copies:
        terms["rotated_qk"] = e * (shape.num_heads + shape.num_query_groups) * head_dim * inside
    if shape.rope and k.rope_tables:
        terms["rope_tables"] = 4 * FP32 * shape.seq_length * head_dim
    selective = recompute == "selective"
    if scores_kept and not selective:
        per_score = e + (1 + e if k.dropout else 0)  # probabilities (+ mask, dropped copy)
        terms["attention_scores"] = per_score * shape.num_heads * shape.seq_length * inside
    elif not scores_kept and not selective:
        terms["softmax_stats"] = FP32 * shape.num_heads * inside
    copies = output_copies if not (scores_kept or selective) else 1
    terms["attention_output"] = copies * e * heads_width * inside
    if mlp:
        terms["mlp_input"] = e * h * outside
        ffn = shape.ffn_hidden
        fc1_out = 2 * ffn if shape.gated else ffn
        terms["mlp_hidden"] = e * (fc1_out + activation_copies * ffn + ffn) * inside
    if k.dropout:
        terms["dropout_masks"] = 2 * h * outside
    return terms


def moe_terms(model: ModelConfig, k: Kernels, *, tokens: int, tp: int, sp: bool, etp: int) -> Terms:
    """An MoE layer's router and experts for ``tokens`` tokens (alltoall dispatch, tokens
    spread evenly over experts). Each rank's experts see its ``top_k`` copies of its
    tokens, gathered over the expert-tensor-parallel group, with ``f / etp`` columns."""
    e, llm = k.bytes_per_value, model.llm
    moe = llm.moe
    ffn = moe.expert_ffn_hidden_size or llm.ffn_hidden_size
    local = tokens / tp if sp else tokens
    routed = local * moe.top_k * etp
    return {
        "mlp_input": e * llm.hidden_size * local,
        "router": 3 * FP32 * moe.num_experts * local,  # fp32 logits, probabilities, map
        "dispatched_tokens": e * llm.hidden_size * routed,
        "expert_hidden": e * (3 + k.swiglu_extra_copies) * ffn / etp * routed,
        "expert_output": e * llm.hidden_size * local * moe.top_k,
    }


def decoder_layer_shape(model: ModelConfig, *, seq_length: int, micro_batch: int) -> LayerShape:
    llm = model.llm
    return LayerShape(
        seq_length=seq_length,
        num_sequences=micro_batch,
        hidden=llm.hidden_size,
        num_heads=llm.num_attention_heads,
        num_query_groups=llm.num_query_groups or llm.num_attention_heads,
        ffn_hidden=llm.ffn_hidden_size,
        gated=True,
        rope=True,
        head_dim=llm.attention_head_dim,
        qk_norm=llm.qk_norm,
    )


def vision_layer_shape(model: ModelConfig, *, tokens_per_image: int, num_images: int) -> LayerShape:
    v = model.vision
    return LayerShape(
        seq_length=tokens_per_image,
        num_sequences=num_images,
        hidden=v.hidden_size,
        num_heads=v.num_attention_heads,
        num_query_groups=v.num_attention_heads,
        ffn_hidden=v.ffn_hidden_size,
        gated=False,
        rope=False,
    )
