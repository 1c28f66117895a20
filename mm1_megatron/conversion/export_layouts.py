"""The Hugging Face names and configs of each export format.

Each ``*_tensors`` function yields ``(name, tensor)`` pairs unit by unit, reading our
TP=1 tensors from a ``CheckpointTensors`` one unit at a time, so the writer streams them
into shards and memory never holds the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from mm1_megatron.config import MM1Config
from mm1_megatron.config.schema import LanguageModelConfig, VisionEncoderConfig
from mm1_megatron.conversion.errors import ConversionError
from mm1_megatron.conversion.mapping import (
    language_attention_shape,
    language_units,
    moe_layer_flags,
    vision_attention_shape,
    vision_post_layernorm_names,
    vision_units,
)
from mm1_megatron.conversion.target_configs import (
    TARGET_CLASSES,
    TARGET_STYLES,
    VISION_CLASSES,
    hf_language_config,
    hf_vision_config,
    language_target,
    vision_target,
)
from mm1_megatron.conversion.tensor_copy import hf_tensors

Tensors = Iterator[Tuple[str, torch.Tensor]]
CONNECTOR_PREFIX = "connector.net."


def language_model_tensors(
    source, llm: LanguageModelConfig, *, dtype: torch.dtype, prefix: str = ""
) -> Tensors:
    target = language_target(llm)
    units = language_units(llm, TARGET_STYLES[target])
    yield from hf_tensors(
        source,
        units,
        language_attention_shape(llm),
        dtype=dtype,
        rename=lambda name: prefix + name,
        label="language model",
    )
    if target == "qwen2_moe":  # the zero-width shared expert: adds exactly zero
        h = llm.hidden_size
        for index, is_moe in enumerate(moe_layer_flags(llm)):
            if is_moe:
                block = f"{prefix}model.layers.{index}.mlp"
                yield f"{block}.shared_expert.gate_proj.weight", torch.zeros(0, h, dtype=dtype)
                yield f"{block}.shared_expert.up_proj.weight", torch.zeros(0, h, dtype=dtype)
                yield f"{block}.shared_expert.down_proj.weight", torch.zeros(h, 0, dtype=dtype)
                yield f"{block}.shared_expert_gate.weight", torch.zeros(1, h, dtype=dtype)


def vision_tensors(
    source,
    vision: VisionEncoderConfig,
    *,
    dtype: torch.dtype,
    prefix: str,
    extras: Dict[str, torch.Tensor],
) -> Tensors:
    """``CLIPVisionModel`` / ``SiglipVisionModel`` tensors under ``prefix``. CLIP's
    post-LayerNorm (which only the pooled output uses) comes from the import when there was
    one, else is the identity; SigLIP's is part of our ViT (``model.vision.post_layernorm``)."""
    yield from hf_tensors(
        source,
        vision_units(vision, prefix),
        vision_attention_shape(vision),
        dtype=dtype,
        label="vision encoder",
    )
    if vision_target(vision) != "clip":
        return
    weight_name, bias_name = vision_post_layernorm_names()
    h = vision.hidden_size
    weight = extras.get(weight_name, torch.ones(h))
    bias = extras.get(bias_name, torch.zeros(h))
    for name, tensor in zip(vision_post_layernorm_names(prefix), (weight, bias)):
        yield name, tensor.to(dtype)


def connector_tensors(source, *, dtype: torch.dtype, rename) -> Tensors:
    for name, tensor in source.fetch(source.names(CONNECTOR_PREFIX)).items():
        yield rename(name[len(CONNECTOR_PREFIX) :]), tensor.to(dtype)


# ---- configs -------------------------------------------------------------------------
def language_model_config(llm: LanguageModelConfig, special: Dict[str, int], dtype: str):
    config = hf_language_config(llm, special=special, dtype=dtype)
    config.architectures = [TARGET_CLASSES[language_target(llm)]]
    return config


def vision_encoder_config(vision: VisionEncoderConfig, dtype: str):
    config = hf_vision_config(vision, dtype=dtype)
    config.architectures = [VISION_CLASSES[vision_target(vision)]]
    return config


def mm1_config(cfg: MM1Config, special: Dict[str, int], dtype: str):
    """``MM1HFConfig`` naming the model code the exporter copies into the folder
    (``auto_map``), so the folder loads with ``trust_remote_code=True`` without our package."""
    from dataclasses import asdict

    from mm1_megatron.hf_model import AUTO_MAP
    from mm1_megatron.hf_model.configuration_mm1 import MM1HFConfig

    if cfg.model.vision.native_resolution:
        check_native_resolution_exportable(cfg)
    config = MM1HFConfig(
        vision_config=hf_vision_config(cfg.model.vision, dtype=dtype).to_dict(),
        text_config=hf_language_config(cfg.model.llm, special=special, dtype=dtype).to_dict(),
        connector_config=asdict(cfg.model.connector),
        image_token_id=special["image"],
        num_image_tokens=cfg.model.connector.num_output_tokens,
        dtype=dtype,
        bos_token_id=special.get("bos"),
        eos_token_id=special.get("eos"),
        pad_token_id=special.get("pad"),
    )
    config.architectures = ["MM1ForConditionalGeneration"]
    config.auto_map = dict(AUTO_MAP)
    return config


def check_native_resolution_exportable(cfg: MM1Config) -> None:
    """A native-resolution ViT exports as ``Siglip2VisionModel`` with
    ``Siglip2ImageProcessor``: one image, one run of ``num_output_tokens`` image tokens, so
    the connector must pool every grid to that count and the images must not be tiled."""
    if cfg.model.connector.type == "mlp":
        raise ConversionError(
            "model.connector.type=mlp makes one token per patch, so images of different "
            "patch grids (model.vision.native_resolution=true) cannot each give "
            "num_output_tokens tokens; only a model with an avg_pool, c_abstractor or "
            "attn_pool connector exports with --format mm1"
        )
    if cfg.data.tiling.mode != "none":
        raise ConversionError(
            f"data.tiling.mode={cfg.data.tiling.mode} cuts fixed-size tiles, but "
            "model.vision.native_resolution=true takes each image whole at its own patch "
            "grid (Siglip2ImageProcessor); set data.tiling.mode=none in the checkpoint's "
            "config.yaml to export one image per <image> marker"
        )


def check_llava_compatible(cfg: MM1Config) -> None:
    connector = cfg.model.connector
    if connector.type != "mlp" or connector.num_readout_layers != 2:
        raise ConversionError(
            f"--format llava needs model.connector.type=mlp with num_readout_layers=2 (LLaVA's "
            f"Linear-GELU-Linear projector); this model has type={connector.type}, "
            f"num_readout_layers={connector.num_readout_layers}. Use --format mm1"
        )
    if vision_target(cfg.model.vision) != "clip":
        raise ConversionError(
            "--format llava needs a CLIP vision tower: LLaVA takes the features before "
            "SigLIP's post-LayerNorm (vision_feature_layer=-1), which our ViT applies. "
            "Use --format mm1"
        )


def llava_config(cfg: MM1Config, special: Dict[str, int], dtype: str):
    from transformers import LlavaConfig

    check_llava_compatible(cfg)
    vision = cfg.model.vision
    config = LlavaConfig(
        vision_config=hf_vision_config(vision, dtype=dtype).to_dict(),
        text_config=hf_language_config(cfg.model.llm, special=special, dtype=dtype).to_dict(),
        image_token_index=special["image"],
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.model.llm.tie_embeddings,
        dtype=dtype,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def llava_projector_name(name: str) -> str:
    """Our MLP connector's ``readout.0`` / ``readout.2`` -> LLaVA's ``linear_1`` / ``linear_2``."""
    layer, param = name.split(".")[1:]
    return f"multi_modal_projector.linear_{1 if layer == '0' else 2}.{param}"


@dataclass(frozen=True)
class FormatNames:
    """Where an export format puts each part: the Hugging Face prefix of the vision tower
    and of the language model, and the connector's names (None: not in the format)."""

    vision_prefix: Optional[str] = None
    language_prefix: Optional[str] = None
    connector: Optional[Callable[[str], str]] = None


def _mm1_connector_name(name: str) -> str:
    return f"connector.{name}"


FORMAT_NAMES = {
    "language-model": FormatNames(language_prefix=""),
    "vision-encoder": FormatNames(vision_prefix="vision_model."),
    "mm1": FormatNames("vision_tower.", "language_model.", _mm1_connector_name),
    # (llava_projector_name is defined further down)
    "llava": FormatNames(
        "vision_tower.vision_model.", "language_model.", lambda name: llava_projector_name(name)
    ),
}


def format_names(fmt: str) -> FormatNames:
    if fmt not in FORMAT_NAMES:
        raise ConversionError(f"unknown export format {fmt!r}")
    return FORMAT_NAMES[fmt]


def format_tensors(
    fmt: str, source, cfg: MM1Config, *, dtype: torch.dtype, extras: Dict[str, torch.Tensor]
) -> Tensors:
    model, names = cfg.model, format_names(fmt)
    if names.vision_prefix is not None:
        yield from vision_tensors(
            source, model.vision, dtype=dtype, prefix=names.vision_prefix, extras=extras
        )
    if names.connector is not None:
        yield from connector_tensors(source, dtype=dtype, rename=names.connector)
    if names.language_prefix is not None:
        yield from language_model_tensors(
            source, model.llm, dtype=dtype, prefix=names.language_prefix
        )


def format_config(fmt: str, cfg: MM1Config, special: Optional[Dict[str, int]], dtype: str):
    if fmt == "language-model":
        return language_model_config(cfg.model.llm, special, dtype)
    if fmt == "vision-encoder":
        return vision_encoder_config(cfg.model.vision, dtype)
    if fmt == "mm1":
        return mm1_config(cfg, special, dtype)
    return llava_config(cfg, special, dtype)
