"""Turn a query and its demonstrations into a ``Prompt``: token ids with each image's
placeholders expanded, and the images preprocessed exactly as in training (files through
the run's image decoder and resize mode, synthetic scenes drawn and normalised)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import torch

from mm1_megatron.batch.contract import expand_image_placeholders
from mm1_megatron.config import MM1Config
from mm1_megatron.data.pipeline.images import build_image_decoder
from mm1_megatron.data.pipeline.packing import normalise_images
from mm1_megatron.data.synthetic.world import Scene, draw_scene
from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.evaluation.protocol import Template, text_only_demos, text_segments
from mm1_megatron.evaluation.tasks.records import EvalExample
from mm1_megatron.inference import Prompt


class PromptBuilder:
    def __init__(self, cfg: MM1Config, tokenizer: Tokenizer):
        vision = cfg.model.vision
        if vision.native_resolution:
            raise ValueError(
                "few-shot evaluation and generation build fixed-size square images, which a "
                "model.vision.native_resolution=true model does not take yet; score its "
                "held-out loss instead (eval.heldout_batches)"
            )
        self.tokenizer = tokenizer
        self.num_image_tokens = cfg.model.connector.num_output_tokens
        self.image_size = vision.image_size
        self.mean, self.std = list(vision.image_mean), list(vision.image_std)
        self.decoder = build_image_decoder(
            cfg.data.images.decoder,
            image_size=vision.image_size,
            mean=vision.image_mean,
            std=vision.image_std,
            resize_mode=cfg.data.images.resize,
            dtype="fp32",
            dali_threads=cfg.data.images.dali_threads,
        )

    def image(self, example: EvalExample) -> torch.Tensor:
        if isinstance(example.image, Scene):
            drawn = draw_scene(example.image, self.image_size)
            return normalise_images([drawn], self.image_size, self.mean, self.std)[0]
        path = Path(example.image)
        (decoded,) = self.decoder.decode([path.read_bytes()])
        if not isinstance(decoded, torch.Tensor):
            raise ValueError(f"image {path} (id {example.example_id}) cannot be decoded: {decoded}")
        return decoded.float()

    def build(
        self,
        template: Template,
        family: str,
        query: EvalExample,
        demos: Sequence[EvalExample],
        text_demos: Sequence[EvalExample] = (),
    ) -> Prompt:
        pieces = text_segments(template, demos, query, family)
        if text_demos:
            pieces[0] = text_only_demos(template, text_demos, family) + pieces[0]
        ids: List[int] = [self.tokenizer.bos_token_id]
        for index, piece in enumerate(pieces):
            if index > 0:
                ids.append(self.tokenizer.image_token_id)
            if piece.strip():
                ids += self.tokenizer.encode(piece)
        ids = expand_image_placeholders(
            ids,
            image_token_id=self.tokenizer.image_token_id,
            num_image_tokens=self.num_image_tokens,
        )
        images = torch.stack([self.image(example) for example in [*demos, query]])
        return Prompt(token_ids=ids, images=images)
