"""Exact parameter counts from a ``ModelConfig``, without building the model.

The formulas mirror the modules layer by layer; tests check them against
``sum(p.numel())`` of built models. Used for the configs' documented sizes, the MM1
learning-rate rule (non-embedding count) and MFU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from mm1_megatron.config.schema import (
    ConnectorConfig,
    LanguageModelConfig,
    ModelConfig,
    VisionEncoderConfig,
)


@dataclass(frozen=True)
class ParameterCounts:
    vision_encoder: int
    connector: int
    language_model: int
    llm_embedding: int  # input embedding plus the untied output layer
    llm_active: int  # language-model parameters used per token (top-k experts only)

    @property
    def total(self) -> int:
        return self.vision_encoder + self.connector + self.language_model

    @property
    def llm_non_embedding(self) -> int:
        return self.language_model - self.llm_embedding

    @property
    def llm_active_non_embedding(self) -> int:
        return self.llm_active - self.llm_embedding


def vision_encoder_params(v: VisionEncoderConfig) -> int:
    h, f = v.hidden_size, v.ffn_hidden_size
    # At native resolution too: one g x g table, resized to each image's grid on the fly.
    num_positions = (v.image_size // v.patch_size) ** 2 + (1 if v.use_class_token else 0)
    per_layer = (
        2 * h  # input LayerNorm
        + h * 3 * h
        + 3 * h  # QKV with bias
        + h * h
        + h  # output projection
        + 2 * h  # pre-MLP LayerNorm
        + h * f
        + f
        + f * h
        + h
    )  # MLP with biases
    return (
        v.num_channels * v.patch_size**2 * h  # patch conv (native resolution: linear)
        + (h if v.patch_embedding_bias else 0)
        + (h if v.use_class_token else 0)
        + num_positions * h
        + (2 * h if v.pre_layernorm else 0)
        + (2 * h if v.post_layernorm else 0)
        + v.num_layers * per_layer
    )


def readout_params(in_dim: int, out_dim: int, num_layers: int) -> int:
    return in_dim * out_dim + out_dim + (num_layers - 1) * (out_dim * out_dim + out_dim)


def bottleneck_params(in_ch: int, out_ch: int) -> int:
    reduced = max(1, in_ch // 4)
    params = (
        in_ch * out_ch
        + 2 * out_ch  # conv1 + norm1
        + 9 * out_ch * out_ch
        + 2 * out_ch  # conv2 (3x3) + norm2
        + out_ch * reduced
        + reduced
        + reduced * out_ch
        + out_ch  # squeeze-excite
        + out_ch * out_ch
        + 2 * out_ch
    )  # conv3 + norm3
    if in_ch != out_ch:
        params += in_ch * out_ch + 2 * out_ch  # projection shortcut
    return params


def connector_params(
    c: ConnectorConfig, *, vision_hidden: int, llm_hidden: int, num_patches: int
) -> int:
    if c.type == "c_abstractor":
        n = c.num_blocks_per_stage
        width = c.hidden_size if n > 0 else vision_hidden
        stage1 = sum(bottleneck_params(vision_hidden if i == 0 else width, width) for i in range(n))
        stage2 = n * bottleneck_params(width, width)
        return (
            num_patches * vision_hidden
            + stage1
            + stage2
            + readout_params(width, llm_hidden, c.num_readout_layers)
        )
    if c.type == "attn_pool":
        d = c.hidden_size
        attention = d * d + 2 * d * vision_hidden + 3 * d + d * d + d
        return (
            c.num_output_tokens * d
            + 2 * vision_hidden
            + attention
            + readout_params(d, llm_hidden, c.num_readout_layers)
        )
    # avg_pool and mlp: the readout MLP only
    return readout_params(vision_hidden, llm_hidden, c.num_readout_layers)


def moe_layer_flags(m: LanguageModelConfig) -> List[bool]:
    """Megatron-Core's ``moe_layer_freq=k``: layers 0, k, 2k, ... are MoE."""
    freq = m.moe.layer_frequency
    return [m.moe.num_experts > 0 and i % freq == 0 for i in range(m.num_layers)]


@dataclass(frozen=True)
class DecoderLayerParams:
    """One decoder layer's parameters by how parallelism splits them: ``attention`` and
    ``dense_mlp`` are tensor-parallel matrices, ``experts`` are spread over expert
    parallelism, ``norms`` and ``router`` are replicated."""

    norms: int
    attention: int  # fused QKV (+ bias) and the output projection
    dense_mlp: int  # SwiGLU of a dense layer (0 for an MoE layer)
    router: int
    experts: int  # all experts of an MoE layer
    active_experts: int  # the top-k experts a token runs through

    @property
    def total(self) -> int:
        return self.norms + self.attention + self.dense_mlp + self.router + self.experts

    @property
    def active(self) -> int:
        return self.norms + self.attention + self.dense_mlp + self.router + self.active_experts


def decoder_layer_params(m: LanguageModelConfig, is_moe: bool) -> DecoderLayerParams:
    h = m.hidden_size
    head_dim = m.attention_head_dim
    groups = m.num_query_groups or m.num_attention_heads
    qkv_rows = (m.num_attention_heads + 2 * groups) * head_dim
    attention = (
        h * qkv_rows
        + (qkv_rows if m.qkv_bias else 0)  # fused QKV (+ bias)
        + m.num_attention_heads * head_dim * h
    )  # output projection
    norms = 2 * h + (2 * head_dim if m.qk_norm else 0)  # input, pre-MLP (and q/k) RMSNorm
    if not is_moe:  # SwiGLU: fc1 is 2f wide
        return DecoderLayerParams(norms, attention, 3 * h * m.ffn_hidden_size, 0, 0, 0)
    per_expert = 3 * h * (m.moe.expert_ffn_hidden_size or m.ffn_hidden_size)
    return DecoderLayerParams(
        norms,
        attention,
        0,
        h * m.moe.num_experts,
        m.moe.num_experts * per_expert,
        m.moe.top_k * per_expert,
    )


def language_model_params(m: LanguageModelConfig) -> tuple:
    """(total, embedding, active) parameter counts of the decoder."""
    h = m.hidden_size
    total = active = 0
    for is_moe in moe_layer_flags(m):
        layer = decoder_layer_params(m, is_moe)
        total += layer.total
        active += layer.active
    embedding = m.vocab_size * h * (1 if m.tie_embeddings else 2)
    final_norm = h
    return total + embedding + final_norm, embedding, active + embedding + final_norm


def count_parameters(model: ModelConfig) -> ParameterCounts:
    v = model.vision
    num_patches = (v.image_size // v.patch_size) ** 2
    llm_total, llm_embedding, llm_active = language_model_params(model.llm)
    return ParameterCounts(
        vision_encoder=vision_encoder_params(v),
        connector=connector_params(
            model.connector,
            vision_hidden=v.hidden_size,
            llm_hidden=model.llm.hidden_size,
            num_patches=num_patches,
        ),
        language_model=llm_total,
        llm_embedding=llm_embedding,
        llm_active=llm_active,
    )


def _adapters(rank: int, shapes, targets) -> int:
    """``rank * (in + out)`` over the ``{name: (in, out)}`` layers named in ``targets``."""
    return sum(rank * (i + o) for name, (i, o) in shapes.items() if name in targets)


def lora_parameters(model: ModelConfig) -> int:
    """Parameters ``model.lora`` adds (models/lora.py): ``r * (in + out)`` per adapted
    linear layer, experts included; 0 with LoRA off."""
    lora = model.lora
    if not lora.enabled:
        return 0
    r, targets, total = lora.rank, set(lora.target_modules), 0
    if "vision_encoder" in lora.parts:
        v = model.vision
        h, f = v.hidden_size, v.ffn_hidden_size
        shapes = {"linear_qkv": (h, 3 * h), "linear_proj": (h, h)}
        shapes.update({"linear_fc1": (h, f), "linear_fc2": (f, h)})
        total += v.num_layers * _adapters(r, shapes, targets)
    if "connector" in lora.parts:
        c, llm_h = model.connector, model.llm.hidden_size
        width = {
            "c_abstractor": c.hidden_size
            if c.num_blocks_per_stage > 0
            else model.vision.hidden_size,
            "attn_pool": c.hidden_size,
        }.get(c.type, model.vision.hidden_size)
        total += r * (width + llm_h) + (c.num_readout_layers - 1) * r * 2 * llm_h
    if "language_model" in lora.parts:
        total += _decoder_adapters(model.llm, r, targets)
    return total


def _decoder_adapters(m: LanguageModelConfig, r: int, targets) -> int:
    h, head_dim = m.hidden_size, m.attention_head_dim
    groups = m.num_query_groups or m.num_attention_heads
    attention = {
        "linear_qkv": (h, (m.num_attention_heads + 2 * groups) * head_dim),
        "linear_proj": (m.num_attention_heads * head_dim, h),
    }
    total = 0
    for is_moe in moe_layer_flags(m):
        total += _adapters(r, attention, targets)
        f = (m.moe.expert_ffn_hidden_size or m.ffn_hidden_size) if is_moe else m.ffn_hidden_size
        mlp = _adapters(r, {"linear_fc1": (h, 2 * f), "linear_fc2": (f, h)}, targets)
        total += mlp * (m.moe.num_experts if is_moe else 1)
    return total
