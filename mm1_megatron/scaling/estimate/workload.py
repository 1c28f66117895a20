"""What one training sequence asks of the model: its length, images and documents.

Memory is sized for the worst micro-batch (every sequence at the image cap); FLOPs and
step time use the same figures unless ``--images-per-sequence`` says otherwise (memory then
follows it) or ``--images-distribution`` gives a measured histogram (FLOPs and step time
take its mean; memory stays at the cap: ``image_counts.py``). At native
resolution every image is its whole patch budget (``model.vision.max_patches``), the
most the size rule gives it (``training.flops.patches_per_image``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

from mm1_megatron.config.schema import MM1Config, ModelConfig
from mm1_megatron.training.flops import one_document_pairs, patches_per_image

IMAGE_SOURCES = ("interleaved", "caption", "conversation", "preference")


@dataclass(frozen=True)
class Workload:
    seq_length: int
    images_per_sequence: float  # images (tiles) per sequence; a mean works for FLOPs
    image_size: int  # pixels of what the encoder sees (the tile size when tiling)
    attention_pairs_per_sequence: int  # causal query-key pairs (one document: the most)
    pixel_bytes: int  # bytes per pixel value the data pipeline delivers (fp32 or bf16)

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


def max_images_per_sequence(cfg: MM1Config) -> int:
    """The image cap a packed sequence can reach: ``data.max_images_per_sequence``
    (which counts tiles), and no more than the sequence's tokens can hold."""
    d = cfg.data
    if not any(d.mixture.get(name, 0) > 0 for name in IMAGE_SOURCES):
        return 0
    per_image = cfg.model.connector.num_output_tokens
    return min(d.max_images_per_sequence, cfg.training.seq_length // per_image)


def default_workload(cfg: MM1Config, images_per_sequence: Optional[float] = None) -> Workload:
    seq = cfg.training.seq_length
    if images_per_sequence is None:
        images_per_sequence = max_images_per_sequence(cfg)
    if images_per_sequence < 0:
        raise ValueError(f"--images-per-sequence={images_per_sequence} must be >= 0")
    tiling = cfg.data.tiling
    image_size = cfg.model.vision.image_size if tiling.mode == "none" else tiling.tile_size
    return Workload(
        seq_length=seq,
        images_per_sequence=images_per_sequence,
        image_size=image_size,
        attention_pairs_per_sequence=one_document_pairs(seq),
        pixel_bytes=2 if cfg.data.images.dtype == "bf16" else 4,
    )


def vision_tokens_per_image(model: ModelConfig, w: Workload) -> int:
    """The ViT's sequence for one image (or tile): its patches and the class token."""
    return patches_per_image(model, w.image_size) + (1 if model.vision.use_class_token else 0)


def pixel_values_per_image(model: ModelConfig, w: Workload) -> int:
    """Values the data pipeline delivers per image: ``c * S * S``, or at native resolution
    ``max_patches`` patches of ``c * p * p``."""
    v = model.vision
    return v.num_channels * patches_per_image(model, w.image_size) * v.patch_size**2


def describe_image_size(model: ModelConfig, w: Workload) -> str:
    """``at 378 px``, or at native resolution the patch budget the estimate assumes."""
    if model.vision.native_resolution:
        return f"at native resolution (counted at {model.vision.max_patches} patches each)"
    return f"at {w.image_size} px"
