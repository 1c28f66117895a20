"""``LlavaProcessor`` files for a Llava export: the processor expands each ``<image>`` in
the prompt into one token per patch, which is exactly our image-token run."""

from __future__ import annotations

import logging
from pathlib import Path

from mm1_megatron.config import MM1Config

logger = logging.getLogger(__name__)


def write_llava_processor(folder: Path, cfg: MM1Config) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    from mm1_megatron.conversion.target_configs import image_processor_config

    settings = {
        k: v
        for k, v in image_processor_config(cfg.model.vision).items()
        if k != "image_processor_type"
    }
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**settings),
        tokenizer=tokenizer,
        patch_size=cfg.model.vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(str(folder))
