"""Our ``LanguageModelConfig`` / ``VisionEncoderConfig`` -> Hugging Face configs for export.

Which ``transformers`` class a decoder becomes (each computes exactly what ours does):

| our decoder | class |
|---|---|
| dense, no q/k/v bias | ``LlamaForCausalLM`` |
| dense, q/k/v bias | ``Qwen2ForCausalLM`` |
| dense, q/k norms (no q/k/v bias) | ``Qwen3ForCausalLM`` |
| MoE on every layer, renormalised top-k >= 2, no q/k/v bias | ``MixtralForCausalLM`` |
| any other MoE (every k-th layer, top-1, not renormalised, q/k/v bias) | ``Qwen2MoeForCausalLM`` |
| MoE with q/k norms (no q/k/v bias) | ``Qwen3MoeForCausalLM`` |

A head size of its own (``model.llm.head_dim``) is the ``head_dim`` every one of these
classes reads. Qwen3's ``attention_bias`` would also put a bias on the output projection,
so q/k norms with q/k/v biases have no exact class and are refused.

MoE on every k-th layer: ``Qwen2MoeForCausalLM`` is the one standard class whose layers
can be dense or MoE individually (``mlp_only_layers``) with a dense FFN width of its own
(``intermediate_size``) next to the experts' (``moe_intermediate_size``), plain RoPE
attention with optional q/k/v biases, and softmax top-k routing that can renormalise
(``norm_topk_prob``). Its shared expert is given width 0 (``shared_expert_intermediate_size:
0``), so it adds exactly zero. Mixtral requires every layer to be MoE; Qwen3-MoE adds
q/k norms (taken where the decoder has them; its dense layers are ``mlp_only_layers``
too), Llama 4 a shared expert and chunked attention, DeepSeek latent attention.
"""

from __future__ import annotations

from typing import Dict, Optional

from mm1_megatron.config.schema import LanguageModelConfig, VisionEncoderConfig
from mm1_megatron.conversion.errors import ConversionError
from mm1_megatron.conversion.mapping import (
    DENSE_STYLE,
    MIXTRAL_STYLE,
    QWEN2_MOE_STYLE,
    moe_layer_flags,
    vision_family,
)
from mm1_megatron.conversion.siglip2 import (
    hf_siglip2_vision_config,
    siglip2_image_processor_config,
)

TARGET_CLASSES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
TARGET_STYLES = {
    "llama": DENSE_STYLE,
    "qwen2": DENSE_STYLE,
    "qwen3": DENSE_STYLE,
    "mixtral": MIXTRAL_STYLE,
    "qwen2_moe": QWEN2_MOE_STYLE,
    "qwen3_moe": QWEN2_MOE_STYLE,
}


def language_target(llm: LanguageModelConfig) -> str:
    """The ``model_type`` our decoder is exported as (see the module docstring)."""
    moe = llm.moe
    if llm.qk_norm:
        if llm.qkv_bias:
            raise ConversionError(
                "model.llm has q/k norms and q/k/v biases: no transformers class computes "
                "that exactly (Qwen3's attention_bias also biases the output projection)"
            )
        return "qwen3_moe" if moe.num_experts else "qwen3"
    if moe.num_experts == 0:
        return "qwen2" if llm.qkv_bias else "llama"
    mixtral_routing = moe.top_k > 1 and moe.renormalizes_top_k
    if moe.layer_frequency == 1 and mixtral_routing and not llm.qkv_bias:
        return "mixtral"
    return "qwen2_moe"


def _rope_parameters(llm: LanguageModelConfig) -> dict:
    theta = float(llm.rotary_base)
    if llm.rope_scaling_factor is None:
        return {"rope_type": "default", "rope_theta": theta}
    from mm1_megatron.conversion.source_configs import LLAMA3_FIXED_ROPE_PARAMETERS

    return {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": float(llm.rope_scaling_factor),
        **LLAMA3_FIXED_ROPE_PARAMETERS,
    }


def _common(llm: LanguageModelConfig, special: Dict[str, Optional[int]], dtype: str) -> dict:
    return dict(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups or llm.num_attention_heads,
        head_dim=llm.attention_head_dim,
        hidden_act="silu",
        max_position_embeddings=llm.max_sequence_length,
        rms_norm_eps=llm.norm_epsilon,
        rope_parameters=_rope_parameters(llm),
        tie_word_embeddings=llm.tie_embeddings,
        attention_dropout=0.0,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
        dtype=dtype,
    )


def hf_language_config(
    llm: LanguageModelConfig, *, special: Dict[str, Optional[int]], dtype: str = "float32"
):
    """A ``transformers`` config of the class ``language_target`` picks."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig

    target = language_target(llm)
    common = _common(llm, special, dtype)
    if target in ("qwen3", "qwen3_moe"):
        return _qwen3_config(llm, target, common)
    if target == "llama":
        return LlamaConfig(
            intermediate_size=llm.ffn_hidden_size, attention_bias=False, mlp_bias=False, **common
        )
    if target == "qwen2":
        return Qwen2Config(
            intermediate_size=llm.ffn_hidden_size,
            use_sliding_window=False,
            sliding_window=None,
            **common,
        )
    moe = llm.moe
    expert_ffn = moe.expert_ffn_hidden_size or llm.ffn_hidden_size
    if target == "mixtral":
        return MixtralConfig(
            intermediate_size=expert_ffn,
            num_local_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            sliding_window=None,
            router_aux_loss_coef=moe.aux_loss_coeff,
            **common,
        )
    return Qwen2MoeConfig(
        intermediate_size=llm.ffn_hidden_size,
        moe_intermediate_size=expert_ffn,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.renormalizes_top_k,
        decoder_sparse_step=1,
        mlp_only_layers=_dense_layers(llm),
        shared_expert_intermediate_size=0,
        qkv_bias=llm.qkv_bias,
        use_sliding_window=False,
        router_aux_loss_coef=moe.aux_loss_coeff,
        **common,
    )


def _dense_layers(llm: LanguageModelConfig) -> list:
    return [i for i, is_moe in enumerate(moe_layer_flags(llm)) if not is_moe]


def _qwen3_config(llm: LanguageModelConfig, target: str, common: dict):
    from transformers import Qwen3Config, Qwen3MoeConfig

    plain_attention = dict(attention_bias=False, use_sliding_window=False, sliding_window=None)
    if target == "qwen3":
        return Qwen3Config(intermediate_size=llm.ffn_hidden_size, **plain_attention, **common)
    moe = llm.moe
    return Qwen3MoeConfig(
        intermediate_size=llm.ffn_hidden_size,
        moe_intermediate_size=moe.expert_ffn_hidden_size or llm.ffn_hidden_size,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        norm_topk_prob=moe.renormalizes_top_k,
        decoder_sparse_step=1,
        mlp_only_layers=_dense_layers(llm),
        router_aux_loss_coef=moe.aux_loss_coeff,
        **plain_attention,
        **common,
    )


HF_VISION_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
}
VISION_CLASSES = {
    "clip": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip2": "Siglip2VisionModel",
}


def vision_target(vision: VisionEncoderConfig) -> str:
    """``clip``, ``siglip`` or ``siglip2`` (see ``mapping.vision_family``), as a
    ``ConversionError``."""
    try:
        return vision_family(vision)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def hf_vision_config(vision: VisionEncoderConfig, *, dtype: str = "float32"):
    """``CLIPVisionConfig``, ``SiglipVisionConfig`` or ``Siglip2VisionConfig`` (without the
    attention-pooling head, which our ViT does not have) of our ViT."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    if vision_target(vision) == "siglip2":
        return hf_siglip2_vision_config(
            vision, hidden_act=HF_VISION_ACTIVATIONS[vision.activation], dtype=dtype
        )
    common = dict(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        num_channels=vision.num_channels,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act=HF_VISION_ACTIVATIONS[vision.activation],
        layer_norm_eps=vision.layernorm_epsilon,
        dtype=dtype,
    )
    if vision_target(vision) == "siglip":
        return SiglipVisionConfig(vision_use_head=False, **common)
    return CLIPVisionConfig(**common)


def image_processor_config(vision: VisionEncoderConfig) -> dict:
    """``preprocessor_config.json`` for ``CLIPImageProcessor``: shorter side to the image
    size, centre crop, rescale to [0, 1], normalise (our ``data.images.resize=crop``); for
    a native-resolution ViT, ``Siglip2ImageProcessor``'s."""
    if vision.native_resolution:
        return siglip2_image_processor_config(vision)
    size = vision.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vision.image_mean),
        "image_std": list(vision.image_std),
        "do_convert_rgb": True,
    }
