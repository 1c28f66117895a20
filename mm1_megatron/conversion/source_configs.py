"""Hugging Face ``config.json`` -> our ``LanguageModelConfig`` / ``VisionEncoderConfig``.

Only what our decoder and ViT compute exactly is accepted; anything else (a RoPE scaling
other than Megatron-Core's Llama-3 rule, biases our layers do not have, a vision model
other than CLIP / SigLIP / SigLIP 2, ...) is a ``ConversionError`` that names the field. Qwen3's
q/k norms and head size of its own map to ``model.llm.qk_norm`` and ``head_dim``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from mm1_megatron.config.schema import (
    CLIP_IMAGE_MEAN,
    CLIP_IMAGE_STD,
    LanguageModelConfig,
    MoEConfig,
    VisionEncoderConfig,
)
from mm1_megatron.conversion.errors import ConversionError, unsupported
from mm1_megatron.conversion.mapping import (
    DENSE_STYLE,
    MIXTRAL_STYLE,
    QWEN2_MOE_STYLE,
)
from mm1_megatron.conversion.siglip2 import (
    SIGLIP2_MODEL_TYPES,
    image_processor_values,
    siglip2_vision_source,
)

logger = logging.getLogger(__name__)

LANGUAGE_MODEL_TYPES = {
    "llama": DENSE_STYLE,
    "mistral": DENSE_STYLE,
    "qwen2": DENSE_STYLE,
    "qwen3": DENSE_STYLE,
    "mixtral": MIXTRAL_STYLE,
    "qwen2_moe": QWEN2_MOE_STYLE,
    "qwen3_moe": QWEN2_MOE_STYLE,  # the same MLP names, plus q/k norms, no shared expert
}
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
CLIP_MODEL_TYPES = ("clip_vision_model", "clip")
SIGLIP_MODEL_TYPES = ("siglip_vision_model", "siglip")
VISION_MODEL_TYPES = CLIP_MODEL_TYPES + SIGLIP_MODEL_TYPES + SIGLIP2_MODEL_TYPES
# transformers hidden_act -> model.vision.activation
VISION_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass
class LanguageSource:
    """What an import needs to know about a Hugging Face causal LM folder."""

    model_type: str
    style: str
    llm: LanguageModelConfig
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    warnings: List[str] = field(default_factory=list)


def _raw_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ConversionError(
            f"{folder} is not a folder; pass a Hugging Face model folder (the output of "
            f"save_pretrained)"
        )
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(
            f"{folder} has no config.json; pass a Hugging Face model folder "
            f"(the output of save_pretrained)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{path} is not valid JSON ({exc}); copy it again") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} is not a JSON object; copy it again")
    return raw


def read_hf_config(folder, *, supported: Sequence[str], what: str, hint: str = ""):
    """``AutoConfig`` of a local folder (JSON only; never remote code). Its ``model_type``
    must be one of ``supported``, checked before ``transformers`` reads the file: a
    relabelled config (Llama keys under ``falcon``) is refused, not half-parsed."""
    from transformers import AutoConfig

    folder = Path(folder)
    path = folder / "config.json"
    model_type = _raw_config(folder).get("model_type")
    if model_type not in supported:
        raise unsupported(
            f"{what} type", model_type, f"{hint or f'Supported: {sorted(supported)}.'} ({path})"
        )
    try:
        return AutoConfig.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # transformers' errors for a config it cannot use vary widely
        raise ConversionError(
            f"cannot read {path} as a {model_type!r} config ({type(exc).__name__}: {exc})"
        ) from None


# The Llama-3 RoPE scaling parameters Megatron-Core's RotaryEmbedding hard-codes (only the
# factor is configurable there).
LLAMA3_FIXED_ROPE_PARAMETERS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama3_factor(params: dict) -> float:
    for name, expected in LLAMA3_FIXED_ROPE_PARAMETERS.items():
        value = params.get(name)
        if value is None or float(value) != expected:
            raise unsupported(
                f"llama3 RoPE scaling {name}",
                value,
                f"Megatron-Core's Llama-3 RoPE scaling uses {name}={expected} "
                f"(and {LLAMA3_FIXED_ROPE_PARAMETERS}); other values would change "
                f"every logit.",
            )
    factor = params.get("factor")
    if factor is None or float(factor) <= 0:
        raise unsupported("llama3 RoPE scaling factor", factor, "It must be a positive number.")
    return float(factor)


def _rope(cfg) -> Tuple[int, Optional[float]]:
    """``(rotary_base, rope_scaling_factor)`` of the source."""
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or {}  # transformers 4
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default", "llama3"):
        raise unsupported(
            "RoPE scaling",
            rope_type,
            "Our decoder applies plain RoPE "
            "(rope_type=default) or Llama-3 scaling (llama3); another scaled "
            "RoPE would change every logit.",
        )
    factor = _llama3_factor({**scaling, **params}) if rope_type == "llama3" else None
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise unsupported("rope_theta", theta, "model.llm.rotary_base is an integer.")
    return int(theta), factor


def _check_common(cfg) -> None:
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", cfg.hidden_act, "Our decoder's MLP is SwiGLU (silu).")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(cfg, name, False):
            raise unsupported(
                name, True, "Our decoder has no biases besides q/k/v (model.llm.qkv_bias)."
            )


def _sliding_window_warning(cfg) -> List[str]:
    window = getattr(cfg, "sliding_window", None)
    uses_window = getattr(cfg, "use_sliding_window", window is not None)
    if uses_window and window and window < cfg.max_position_embeddings:
        return [
            f"the source uses sliding-window attention ({window} tokens); our decoder "
            f"attends to the whole sequence, which is identical for sequences of up to "
            f"{window} tokens"
        ]
    return []


def _head_dim(cfg) -> Optional[int]:
    """``model.llm.head_dim``: None where it is hidden / heads (Megatron-Core's default)."""
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim is None or head_dim == cfg.hidden_size / cfg.num_attention_heads:
        return None
    return int(head_dim)


def _moe_config(cfg, model_type: str) -> MoEConfig:
    """Softmax routing over all experts, top-k, renormalised (Mixtral; Qwen with
    ``norm_topk_prob``) or not (``model.llm.moe.normalize_top_k``)."""
    if model_type == "mixtral":
        num_experts, ffn = cfg.num_local_experts, cfg.intermediate_size
        normalised, frequency = True, 1
    else:
        num_experts, ffn = cfg.num_experts, cfg.moe_intermediate_size
        normalised = bool(cfg.norm_topk_prob)
        frequency = _qwen2_moe_frequency(cfg)
    top_k = cfg.num_experts_per_tok
    if top_k == 1 and normalised:
        raise unsupported(
            "router normalisation",
            "top_k=1, renormalised",
            "Every token's expert would get weight 1, which Megatron-Core's router cannot "
            "train (a softmax over one logit has no gradient).",
        )
    moe = MoEConfig(
        num_experts=num_experts,
        top_k=top_k,
        layer_frequency=frequency,
        expert_ffn_hidden_size=ffn,
        normalize_top_k=normalised,
    )
    coefficient = getattr(cfg, "router_aux_loss_coef", None)
    if coefficient is not None:
        moe.aux_loss_coeff = float(coefficient)
    return moe


def _qwen2_moe_frequency(cfg) -> int:
    """The k with MoE exactly on layers 0, k, 2k, ... (our layout), or an error."""
    only_mlp = set(cfg.mlp_only_layers or [])
    flags = [
        i not in only_mlp and (i + 1) % cfg.decoder_sparse_step == 0
        for i in range(cfg.num_hidden_layers)
    ]
    for frequency in range(1, cfg.num_hidden_layers + 1):
        if flags == [i % frequency == 0 for i in range(cfg.num_hidden_layers)]:
            return frequency
    moe_layers = [i for i, flag in enumerate(flags) if flag]
    raise unsupported(
        "MoE layer placement",
        moe_layers,
        "Our decoder puts experts on layers 0, k, 2k, ... (model.llm.moe.layer_frequency=k).",
    )


def language_source(folder) -> LanguageSource:
    """Translate a causal LM's config; raises ``ConversionError`` for what we cannot run."""
    cfg = read_hf_config(folder, supported=tuple(LANGUAGE_MODEL_TYPES), what="language model")
    model_type = cfg.model_type
    _check_common(cfg)
    moe = _moe_config(cfg, model_type) if model_type in MOE_MODEL_TYPES else MoEConfig()
    dense_ffn = cfg.intermediate_size
    rotary_base, rope_scaling_factor = _rope(cfg)
    llm = LanguageModelConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        ffn_hidden_size=dense_ffn,
        max_sequence_length=cfg.max_position_embeddings,
        rotary_base=rotary_base,
        rope_scaling_factor=rope_scaling_factor,
        norm_epsilon=cfg.rms_norm_eps,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "qkv_bias", False)),
        head_dim=_head_dim(cfg),
        qk_norm=model_type in QK_NORM_MODEL_TYPES,
        moe=moe,
    )
    if llm.num_query_groups == llm.num_attention_heads:
        llm.num_query_groups = None
    return LanguageSource(
        model_type=model_type,
        style=LANGUAGE_MODEL_TYPES[model_type],
        llm=llm,
        bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=getattr(cfg, "eos_token_id", None),
        pad_token_id=getattr(cfg, "pad_token_id", None),
        warnings=_sliding_window_warning(cfg),
    )


def _image_normalisation(folder: Path):
    values, _ = image_processor_values(folder)
    if "image_mean" in values and "image_std" in values:
        return list(values["image_mean"]), list(values["image_std"])
    return list(CLIP_IMAGE_MEAN), list(CLIP_IMAGE_STD)


def vision_source(folder) -> VisionEncoderConfig:
    """A ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Siglip2VisionModel`` (NaFlex) or
    the vision half of a ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` -> our ViT
    config."""
    folder = Path(folder)
    cfg = read_hf_config(
        folder,
        supported=VISION_MODEL_TYPES,
        what="vision model",
        hint=f"Supported: {list(VISION_MODEL_TYPES)} (CLIPVisionModel, SiglipVisionModel, "
        f"Siglip2VisionModel, or the vision tower of a CLIPModel / SiglipModel / "
        f"Siglip2Model).",
    )
    siglip = cfg.model_type in SIGLIP_MODEL_TYPES
    vision_cfg = cfg.vision_config if cfg.model_type in ("clip", "siglip", "siglip2") else cfg
    if vision_cfg.hidden_act not in VISION_ACTIVATIONS:
        raise unsupported(
            "vision hidden_act", vision_cfg.hidden_act, f"Supported: {sorted(VISION_ACTIVATIONS)}."
        )
    activation = VISION_ACTIVATIONS[vision_cfg.hidden_act]
    if cfg.model_type in SIGLIP2_MODEL_TYPES:
        return siglip2_vision_source(vision_cfg, folder, activation=activation)
    mean, std = _image_normalisation(folder)
    return VisionEncoderConfig(
        image_size=vision_cfg.image_size,
        patch_size=vision_cfg.patch_size,
        num_channels=vision_cfg.num_channels,
        hidden_size=vision_cfg.hidden_size,
        num_layers=vision_cfg.num_hidden_layers,
        num_attention_heads=vision_cfg.num_attention_heads,
        ffn_hidden_size=vision_cfg.intermediate_size,
        activation=activation,
        use_class_token=not siglip,
        patch_embedding_bias=siglip,
        pre_layernorm=not siglip,
        post_layernorm=siglip,
        layernorm_epsilon=vision_cfg.layer_norm_eps,
        image_mean=mean,
        image_std=std,
    )
