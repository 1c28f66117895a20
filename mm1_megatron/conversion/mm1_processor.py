"""The processor of an ``mm1`` export: ``MM1Processor`` and its image processor.

Every ``mm1`` export gets ``MM1Processor`` (``processor_config.json``: the image marker
and the connector's token count; code ``processing_mm1.py``, named in ``auto_map``), so
``AutoProcessor.from_pretrained(folder, trust_remote_code=True)`` and the
``image-text-to-text`` pipeline expand each ``<image>`` marker of a prompt as training did.
Its image processor is

- for a run that tiles its images (``data.tiling``), ``MM1ImageProcessor``
  (``preprocessor_config.json``: the run's tiling settings and the encoder's mean / std;
  code ``image_processing_mm1.py``): it cuts training's tiles, and each marker becomes one
  placeholder per tile, each the connector's ``num_output_tokens`` image tokens;
- otherwise the ``CLIPImageProcessor`` config (``hf_files.write_image_processor_config``):
  one image, one placeholder;
- for a native-resolution ViT (``model.vision.native_resolution``, never tiled), the
  ``Siglip2ImageProcessor`` config (``max_num_patches: model.vision.max_patches``, the
  encoder's patch size, mean and std): one image, one placeholder, its patches padded to
  ``max_patches`` with ``pixel_attention_mask`` and ``spatial_shapes`` beside them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mm1_megatron.config import MM1Config
from mm1_megatron.data.shards.conversations import IMAGE_MARKER
from mm1_megatron.data.shards.video_records import VIDEO_MARKER

logger = logging.getLogger(__name__)


def _tiled(cfg: MM1Config) -> bool:
    return cfg.data.tiling.mode != "none"


def processor_config(cfg: MM1Config) -> dict:
    """``processor_config.json`` of ``MM1Processor``. Video frames' time markers are
    written as training wrote them: digits (``mm1 data shards videos``), or for the
    synthetic tokenizer its words for whole seconds (the synthetic clips)."""
    from mm1_megatron.data.synthetic.video import SECOND_WORDS
    from mm1_megatron.hf_model import PROCESSOR_AUTO_MAP

    synthetic = cfg.data.tokenizer.kind == "synthetic"
    return {
        "processor_class": "MM1Processor",
        "auto_map": {"AutoProcessor": PROCESSOR_AUTO_MAP["AutoProcessor"]},
        "num_image_tokens": cfg.model.connector.num_output_tokens,
        "image_token": IMAGE_MARKER,
        "tile_separator": cfg.data.tiling.separator if _tiled(cfg) else None,
        "video_token": VIDEO_MARKER,
        "frame_time_words": list(SECOND_WORDS) if synthetic else None,
    }


def tiling_processor_configs(cfg: MM1Config):
    """``(preprocessor_config, processor_config)`` dicts for the run's tiles."""
    from mm1_megatron.hf_model import PROCESSOR_AUTO_MAP

    tiling, vision = cfg.data.tiling, cfg.model.vision
    settings = {
        "mode": tiling.mode,
        "tile_size": tiling.tile_size,
        "static_grid": list(tiling.static_grid),
        "min_tiles": tiling.min_tiles,
        "max_tiles": tiling.max_tiles,
        "overview": tiling.overview,
        "max_images_to_split": tiling.max_images_to_split,
        "image_mean": [float(m) for m in vision.image_mean],
        "image_std": [float(s) for s in vision.image_std],
    }
    image_processor = {
        "image_processor_type": "MM1ImageProcessor",
        "auto_map": dict(PROCESSOR_AUTO_MAP),
        **settings,
    }
    return image_processor, processor_config(cfg)


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _write_tiling_image_processor(folder: Path, cfg: MM1Config) -> None:
    from mm1_megatron.hf_model import PROCESSOR_CODE_FILES, write_model_code
    from mm1_megatron.hf_model.image_processing_mm1 import MM1ImageProcessor

    image_processor, _ = tiling_processor_configs(cfg)
    skip = ("auto_map", "image_processor_type")
    MM1ImageProcessor(**{k: v for k, v in image_processor.items() if k not in skip})  # checks
    write_model_code(folder, PROCESSOR_CODE_FILES)
    _write_json(Path(folder) / "preprocessor_config.json", image_processor)
    logger.info(
        "wrote MM1Processor: %s tiles of %d px", cfg.data.tiling.mode, cfg.data.tiling.tile_size
    )


def write_mm1_processor(folder: Path, cfg: MM1Config) -> None:
    from mm1_megatron.conversion.hf_files import write_image_processor_config
    from mm1_megatron.hf_model import write_model_code

    if _tiled(cfg):
        _write_tiling_image_processor(folder, cfg)
    else:
        write_image_processor_config(folder, cfg.model.vision)
        write_model_code(folder, ("processing_mm1.py",))
    _write_json(Path(folder) / "processor_config.json", processor_config(cfg))
