"""Which Megatron-Core tensor of ``MM1Model`` corresponds to which Hugging Face tensors.

A ``TensorRule`` names one tensor of our TP=1 model and the Hugging Face tensors it is
made of, and how (``kind``):

- ``copy``: the same tensor under another name;
- ``qkv``: Megatron's fused ``linear_qkv`` (weight or bias) is grouped per query group,
  ``[q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...]`` (see
  ``SelfAttention.get_query_key_value_tensors``), from separate ``q_proj``, ``k_proj``,
  ``v_proj``;
- ``glu``: a SwiGLU ``linear_fc1`` is ``[gate; up]`` stacked along the output rows.

Rules come in ``units`` (the embedding, one decoder layer, the final norm and head), the
granularity at which import and export stream. The same rules drive both directions, so
an import followed by an export reproduces every tensor bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from mm1_megatron.config.schema import LanguageModelConfig, VisionEncoderConfig
from mm1_megatron.models.param_count import moe_layer_flags

LANGUAGE_PREFIX = "language_model."
VISION_PREFIX = "vision_encoder."

# Hugging Face naming of the decoder MLP, per target/source family.
DENSE_STYLE = "llama"  # LlamaForCausalLM, MistralForCausalLM, Qwen2/Qwen3ForCausalLM
MIXTRAL_STYLE = "mixtral"  # MixtralForCausalLM: block_sparse_moe.{gate, experts.E.w1/w2/w3}
QWEN2_MOE_STYLE = "qwen2_moe"  # Qwen2Moe/Qwen3MoeForCausalLM: mlp.{gate, experts.E.*_proj}
MLP_STYLES = (DENSE_STYLE, MIXTRAL_STYLE, QWEN2_MOE_STYLE)


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_groups: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups


@dataclass(frozen=True)
class TensorRule:
    megatron: str  # full name in MM1Model.state_dict()
    hf: Tuple[str, ...]  # the Hugging Face tensor(s), in fusion order
    kind: str = "copy"  # copy | qkv | glu


Unit = Tuple[str, List[TensorRule]]  # (label for progress and errors, rules)


# ---- tensor layouts ------------------------------------------------------------------
def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape
) -> torch.Tensor:
    """Separate q/k/v projections (weights ``[rows, in]`` or biases ``[rows]``) -> fused."""
    groups, d, rest = shape.num_groups, shape.head_dim, q.shape[1:]
    parts = [
        q.reshape(groups, shape.heads_per_group * d, *rest),
        k.reshape(groups, d, *rest),
        v.reshape(groups, d, *rest),
    ]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> Tuple[torch.Tensor, ...]:
    groups, d, rest = shape.num_groups, shape.head_dim, qkv.shape[1:]
    grouped = qkv.reshape(groups, (shape.heads_per_group + 2) * d, *rest)
    q, k, v = grouped.split([shape.heads_per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


def combine(
    rule: TensorRule, tensors: Sequence[torch.Tensor], shape: AttentionShape
) -> torch.Tensor:
    """Hugging Face tensors of ``rule`` -> the Megatron tensor."""
    if rule.kind == "qkv":
        return fuse_qkv(*tensors, shape)
    if rule.kind == "glu":
        return torch.cat(list(tensors), dim=0)
    (tensor,) = tensors
    return tensor


def separate(
    rule: TensorRule, tensor: torch.Tensor, shape: AttentionShape
) -> Dict[str, torch.Tensor]:
    """The Megatron tensor of ``rule`` -> its Hugging Face tensors by name."""
    if rule.kind == "qkv":
        parts = split_qkv(tensor, shape)
    elif rule.kind == "glu":
        parts = tensor.chunk(2, dim=0)
    else:
        parts = (tensor,)
    return dict(zip(rule.hf, parts))


# ---- language model ------------------------------------------------------------------
def language_attention_shape(llm: LanguageModelConfig) -> AttentionShape:
    return AttentionShape(
        llm.num_attention_heads,
        llm.num_query_groups or llm.num_attention_heads,
        llm.attention_head_dim,
    )


def _attention_rules(llm: LanguageModelConfig, ours: str, theirs: str) -> List[TensorRule]:
    attn = f"{theirs}.self_attn"
    rules = [
        TensorRule(f"{ours}.input_layernorm.weight", (f"{theirs}.input_layernorm.weight",)),
        TensorRule(
            f"{ours}.self_attention.linear_qkv.weight",
            tuple(f"{attn}.{p}_proj.weight" for p in "qkv"),
            "qkv",
        ),
        TensorRule(f"{ours}.self_attention.linear_proj.weight", (f"{attn}.o_proj.weight",)),
        TensorRule(
            f"{ours}.pre_mlp_layernorm.weight", (f"{theirs}.post_attention_layernorm.weight",)
        ),
    ]
    if llm.qk_norm:  # Qwen3: one RMSNorm weight per head width, shared by all heads
        rules += [
            TensorRule(f"{ours}.self_attention.q_layernorm.weight", (f"{attn}.q_norm.weight",)),
            TensorRule(f"{ours}.self_attention.k_layernorm.weight", (f"{attn}.k_norm.weight",)),
        ]
    if llm.qkv_bias:
        rules.append(
            TensorRule(
                f"{ours}.self_attention.linear_qkv.bias",
                tuple(f"{attn}.{p}_proj.bias" for p in "qkv"),
                "qkv",
            )
        )
    return rules


def _swiglu_rules(ours: str, gate: str, up: str, down: str) -> List[TensorRule]:
    return [
        TensorRule(f"{ours}.linear_fc1.weight", (gate, up), "glu"),
        TensorRule(f"{ours}.linear_fc2.weight", (down,)),
    ]


def _moe_units(
    llm: LanguageModelConfig, ours: str, theirs: str, style: str, label: str
) -> List[Unit]:
    """The router goes with the layer's attention; each expert is a unit of its own, so
    a layer with many experts never has to be in memory whole."""
    if style == MIXTRAL_STYLE:
        block, names = f"{theirs}.block_sparse_moe", ("w1", "w3", "w2")
    elif style == QWEN2_MOE_STYLE:
        block, names = f"{theirs}.mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        raise ValueError(f"MLP style {style!r} has no experts")
    router = TensorRule(f"{ours}.mlp.router.weight", (f"{block}.gate.weight",))
    units: List[Unit] = [(label, _attention_rules(llm, ours, theirs) + [router])]
    for expert in range(llm.moe.num_experts):
        gate, up, down = (f"{block}.experts.{expert}.{n}.weight" for n in names)
        units.append(
            (
                f"{label} expert {expert}",
                _swiglu_rules(f"{ours}.mlp.experts.local_experts.{expert}", gate, up, down),
            )
        )
    return units


def language_units(llm: LanguageModelConfig, style: str) -> List[Unit]:
    """Rules for the decoder, unit by unit, with Hugging Face ``*ForCausalLM`` names."""
    ours_root = LANGUAGE_PREFIX
    units: List[Unit] = [
        (
            "embedding",
            [
                TensorRule(
                    f"{ours_root}embedding.word_embeddings.weight", ("model.embed_tokens.weight",)
                )
            ],
        )
    ]
    for index, is_moe in enumerate(moe_layer_flags(llm)):
        ours, theirs = f"{ours_root}decoder.layers.{index}", f"model.layers.{index}"
        label = f"decoder layer {index}"
        if is_moe:
            units += _moe_units(llm, ours, theirs, style, label)
            continue
        mlp = f"{theirs}.mlp"
        units.append(
            (
                label,
                _attention_rules(llm, ours, theirs)
                + _swiglu_rules(
                    f"{ours}.mlp",
                    f"{mlp}.gate_proj.weight",
                    f"{mlp}.up_proj.weight",
                    f"{mlp}.down_proj.weight",
                ),
            )
        )
    head = [TensorRule(f"{ours_root}decoder.final_layernorm.weight", ("model.norm.weight",))]
    if not llm.tie_embeddings:
        head.append(TensorRule(f"{ours_root}output_layer.weight", ("lm_head.weight",)))
    units.append(("final norm and output layer", head))
    return units


# ---- vision encoder ------------------------------------------------------------------
def vision_attention_shape(vision: VisionEncoderConfig) -> AttentionShape:
    heads = vision.num_attention_heads
    return AttentionShape(heads, heads, vision.hidden_size // heads)


def vision_units(vision: VisionEncoderConfig, hf_prefix: str = "") -> List[Unit]:
    """Rules for the ViT with ``CLIPVisionModel`` / ``SiglipVisionModel`` /
    ``Siglip2VisionModel`` names under ``hf_prefix`` (``vision_model.`` in ``CLIPModel`` /
    ``SiglipModel`` / ``Siglip2Model`` and in CLIP checkpoints saved by transformers 4).
    All share the encoder layers' names; the stem follows ``model.vision`` (class token,
    patch bias, pre- or post-LayerNorm). SigLIP 2's linear patch embedding
    (``native_resolution``) has the same names as the patch convolution, and its weight
    is ``[hidden, p*p*c]`` in both models."""
    ours_root, p = VISION_PREFIX, hf_prefix
    names = [
        ("patch_embedding.weight", "embeddings.patch_embedding.weight"),
        ("position_embedding", "embeddings.position_embedding.weight"),
    ]
    if vision.use_class_token:
        names.insert(0, ("class_embedding", "embeddings.class_embedding"))
    if vision.patch_embedding_bias:
        names.append(("patch_embedding.bias", "embeddings.patch_embedding.bias"))
    if vision.pre_layernorm:
        names += [
            ("pre_layernorm.weight", "pre_layrnorm.weight"),  # CLIP's spelling
            ("pre_layernorm.bias", "pre_layrnorm.bias"),
        ]
    if vision.post_layernorm:  # SigLIP's, on every token
        names += [
            ("post_layernorm.weight", "post_layernorm.weight"),
            ("post_layernorm.bias", "post_layernorm.bias"),
        ]
    stem = [TensorRule(f"{ours_root}{ours}", (f"{p}{theirs}",)) for ours, theirs in names]
    units: List[Unit] = [("patch and position embeddings", stem)]
    for index in range(vision.num_layers):
        ours, theirs = f"{ours_root}transformer.layers.{index}", f"{p}encoder.layers.{index}"
        rules = []
        for param in ("weight", "bias"):
            rules += [
                TensorRule(f"{ours}.input_layernorm.{param}", (f"{theirs}.layer_norm1.{param}",)),
                TensorRule(
                    f"{ours}.self_attention.linear_qkv.{param}",
                    tuple(f"{theirs}.self_attn.{q}_proj.{param}" for q in "qkv"),
                    "qkv",
                ),
                TensorRule(
                    f"{ours}.self_attention.linear_proj.{param}",
                    (f"{theirs}.self_attn.out_proj.{param}",),
                ),
                TensorRule(f"{ours}.pre_mlp_layernorm.{param}", (f"{theirs}.layer_norm2.{param}",)),
                TensorRule(f"{ours}.mlp.linear_fc1.{param}", (f"{theirs}.mlp.fc1.{param}",)),
                TensorRule(f"{ours}.mlp.linear_fc2.{param}", (f"{theirs}.mlp.fc2.{param}",)),
            ]
        units.append((f"vision layer {index}", rules))
    return units


def vision_family(vision: VisionEncoderConfig) -> str:
    """``clip``, ``siglip`` or ``siglip2`` (native resolution): the transformers vision
    tower that computes what our ViT does, or ``ValueError`` for a combination none has."""
    stem = (
        vision.use_class_token,
        vision.patch_embedding_bias,
        vision.pre_layernorm,
        vision.post_layernorm,
    )
    if stem == (True, False, True, False) and not vision.native_resolution:
        return "clip"
    if stem == (False, True, False, True):
        return "siglip2" if vision.native_resolution else "siglip"
    raise ValueError(
        f"model.vision with use_class_token={vision.use_class_token}, patch_embedding_bias="
        f"{vision.patch_embedding_bias}, pre_layernorm={vision.pre_layernorm}, post_layernorm="
        f"{vision.post_layernorm}, native_resolution={vision.native_resolution} has no exact "
        f"transformers class (CLIPVisionModel: class token and pre-LayerNorm only; "
        f"SiglipVisionModel: patch bias and post-LayerNorm only; Siglip2VisionModel: "
        f"SigLIP's with native_resolution)"
    )


def vision_post_layernorm_names(hf_prefix: str = "") -> Tuple[str, str]:
    """CLIP's post-LayerNorm (pooled output only): kept aside on import, restored on export."""
    return f"{hf_prefix}post_layernorm.weight", f"{hf_prefix}post_layernorm.bias"
