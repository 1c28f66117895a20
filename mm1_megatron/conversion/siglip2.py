"""SigLIP 2 NaFlex towers (``Siglip2VisionModel``, or the vision half of ``Siglip2Model``)
<-> our native-resolution ViT (``model.vision.native_resolution``).

Only NaFlex checkpoints (``google/siglip2-*-naflex``) carry ``model_type`` ``siglip2`` /
``siglip2_vision_model``: a linear patch embedding over flattened ``p*p*c`` patches and a
``g x g`` position table resized per image. The fixed-resolution SigLIP 2 checkpoints
(``google/siglip2-*-patch16-224`` and the like) are published as ``model_type``
``siglip`` (``SiglipModel``, a patch convolution; transformers' SigLIP 2 page calls
them "FixRes ... backward compatible with SigLIP"), so they import and export through
the SigLIP path unchanged.

The tensors keep SigLIP's names (``embeddings.patch_embedding`` is ``[hidden, p*p*c]``
in both, our ``nn.Linear`` included), so ``mapping.vision_units`` serves both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Tuple

from mm1_megatron.config.schema import VisionEncoderConfig
from mm1_megatron.conversion.errors import ConversionError, unsupported

SIGLIP2_MODEL_TYPES = ("siglip2_vision_model", "siglip2")
# Siglip2ImageProcessor's defaults, for a folder without preprocessor_config.json.
SIGLIP2_IMAGE_MEAN = [0.5, 0.5, 0.5]
SIGLIP2_IMAGE_STD = [0.5, 0.5, 0.5]
SIGLIP2_MAX_NUM_PATCHES = 256


def _square_patch(patch_size) -> int:
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise unsupported("vision patch_size", list(patch_size), "Our patches are square.")
        patch_size = patch_size[0]
    return int(patch_size)


def _position_grid(num_patches: int) -> int:
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise unsupported(
            "vision num_patches",
            num_patches,
            "SigLIP 2's position table is g x g: num_patches must be a square number "
            "(256 = 16 x 16).",
        )
    return grid


def image_processor_values(folder: Path) -> Tuple[dict, Path]:
    """The folder's image processor settings and the file they came from: transformers'
    ``preprocessor_config.json``, or the ``image_processor`` section of the single
    ``processor_config.json`` that transformers 5 writes for a whole processor; ``{}``
    when neither exists (the caller's defaults apply)."""
    for name, section in (
        ("preprocessor_config.json", None),
        ("processor_config.json", "image_processor"),
    ):
        path = folder / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConversionError(f"{path} is not valid JSON ({exc}); copy it again") from None
        if section is not None:
            values = values.get(section) if isinstance(values, dict) else None
            if values is None:
                continue
        if not isinstance(values, dict):
            raise ConversionError(f"{path} is not a JSON object; copy it again")
        return values, path
    return {}, folder / "preprocessor_config.json"


def _processor_settings(folder: Path, patch_size: int) -> Tuple[List[float], List[float], int]:
    """``(image_mean, image_std, max_num_patches)`` of the folder's image processor."""
    values, path = image_processor_values(folder)
    processor_patch = values.get("patch_size", patch_size)
    if processor_patch != patch_size:
        raise ConversionError(
            f"{path} cuts {processor_patch}-px patches but the model embeds {patch_size}-px "
            f"ones; fix patch_size in one of them"
        )
    return (
        list(values.get("image_mean", SIGLIP2_IMAGE_MEAN)),
        list(values.get("image_std", SIGLIP2_IMAGE_STD)),
        int(values.get("max_num_patches", SIGLIP2_MAX_NUM_PATCHES)),
    )


def siglip2_vision_source(cfg, folder: Path, *, activation: str) -> VisionEncoderConfig:
    """A ``Siglip2VisionConfig`` -> our native-resolution ViT (SigLIP's stem)."""
    patch = _square_patch(cfg.patch_size)
    grid = _position_grid(cfg.num_patches)
    mean, std, max_patches = _processor_settings(Path(folder), patch)
    return VisionEncoderConfig(
        image_size=grid * patch,
        patch_size=patch,
        num_channels=cfg.num_channels,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        activation=activation,
        use_class_token=False,
        patch_embedding_bias=True,
        pre_layernorm=False,
        post_layernorm=True,
        layernorm_epsilon=cfg.layer_norm_eps,
        image_mean=mean,
        image_std=std,
        native_resolution=True,
        max_patches=max_patches,
    )


def hf_siglip2_vision_config(vision: VisionEncoderConfig, *, hidden_act: str, dtype: str):
    """``Siglip2VisionConfig`` of our native-resolution ViT, without the pooling head."""
    from transformers import Siglip2VisionConfig

    return Siglip2VisionConfig(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.ffn_hidden_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads,
        num_channels=vision.num_channels,
        patch_size=vision.patch_size,
        num_patches=(vision.image_size // vision.patch_size) ** 2,
        hidden_act=hidden_act,
        layer_norm_eps=vision.layernorm_epsilon,
        vision_use_head=False,
        dtype=dtype,
    )


def siglip2_image_processor_config(vision: VisionEncoderConfig) -> dict:
    """``preprocessor_config.json`` for ``Siglip2ImageProcessor``: each image resized,
    aspect ratio kept, to at most ``max_patches`` patches, rescaled and normalised."""
    return {
        "image_processor_type": "Siglip2ImageProcessor",
        "do_resize": True,
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(vision.image_mean),
        "image_std": list(vision.image_std),
        "do_convert_rgb": True,
        "patch_size": vision.patch_size,
        "max_num_patches": vision.max_patches,
    }
