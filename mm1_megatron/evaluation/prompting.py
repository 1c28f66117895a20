"""Turn a query and its demonstrations into a ``Prompt``: token ids with each image's
placeholders expanded, and the images preprocessed exactly as in training (files through
the run's image decoder and resize mode, synthetic scenes drawn and normalised).

At native resolution (``model.vision.native_resolution``) each image is resized by the
training pipeline's size rule (``data/pipeline/native_resolution.py``): a file through the
same PIL decoder, at its own aspect ratio within ``model.vision.max_patches``; a synthetic
scene at one of the sizes the synthetic world draws in training
(``synthetic.sequences.native_image_sizes``), picked from the scene itself so every rank
and every run draws it alike. The prompt's images are then packed into patches with
their grids, as a training sequence's are.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from mm1_megatron.batch.contract import expand_image_placeholders
from mm1_megatron.config import MM1Config
from mm1_megatron.data.pipeline.images import build_image_decoder
from mm1_megatron.data.pipeline.native_resolution import native_resolution_of
from mm1_megatron.data.pipeline.packing import normalise_images
from mm1_megatron.data.synthetic.sequences import native_image_sizes
from mm1_megatron.data.synthetic.video import Clip, time_words
from mm1_megatron.data.synthetic.world import Scene, draw_scene
from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.evaluation.protocol import Template, text_only_demos, text_segments
from mm1_megatron.evaluation.tasks.records import EvalExample
from mm1_megatron.inference import Prompt

PackedImages = Tuple[torch.Tensor, Optional[torch.Tensor]]  # images, and grids if patches


class PromptBuilder:
    def __init__(self, cfg: MM1Config, tokenizer: Tokenizer):
        vision = cfg.model.vision
        self.tokenizer = tokenizer
        self.num_image_tokens = cfg.model.connector.num_output_tokens
        self.image_size = vision.image_size
        self.mean, self.std = list(vision.image_mean), list(vision.image_std)
        self.native = native_resolution_of(vision)
        self.scene_sizes = (
            None if self.native is None else native_image_sizes(vision.image_size, self.native)
        )
        self.decoder = build_image_decoder(
            cfg.data.images.decoder,
            image_size=vision.image_size,
            mean=vision.image_mean,
            std=vision.image_std,
            resize_mode=cfg.data.images.resize,
            dtype="fp32",
            dali_threads=cfg.data.images.dali_threads,
            native=self.native,
        )

    def images(self, example: EvalExample) -> List[torch.Tensor]:
        """The example's normalised images (a video's frames): ``[c, S, S]`` each, or at
        native resolution ``[c, h, w]`` at the size rule's size (``pack`` makes patches)."""
        if isinstance(example.image, Clip):
            size = self._scene_size(example.image)
            return [self._drawn(frame, size) for frame in example.image.frames]
        if isinstance(example.image, Scene):
            return [self._drawn(example.image, self._scene_size(example.image))]
        path = Path(example.image)
        (decoded,) = self.decoder.decode([path.read_bytes()])
        if not isinstance(decoded, torch.Tensor):
            raise ValueError(f"image {path} (id {example.example_id}) cannot be decoded: {decoded}")
        return [decoded.float()]

    def image(self, example: EvalExample) -> torch.Tensor:
        """The example's one image (what retrieval embeds); a video has several."""
        if isinstance(example.image, Clip):
            raise ValueError(
                f"example {example.example_id} is a video: retrieval-chosen demonstrations "
                "embed one image per example; evaluate video tasks with random demonstrations"
            )
        return self.images(example)[0]

    def visual_ids(self, example: EvalExample) -> List[int]:
        """What stands for the example's image in the prompt: one placeholder, or for a
        video each frame's time marker and placeholder, as in training."""
        if not isinstance(example.image, Clip):
            return [self.tokenizer.image_token_id]
        ids: List[int] = []
        for seconds in range(len(example.image.frames)):
            ids += self.tokenizer.encode(" ".join(time_words(seconds)))
            ids.append(self.tokenizer.image_token_id)
        return ids

    def _scene_size(self, drawn) -> Optional[Tuple[int, int]]:
        if self.scene_sizes is None:
            return None
        # repr, not hash(): Python salts string hashes per process, and ranks must agree.
        return self.scene_sizes[zlib.crc32(repr(drawn).encode()) % len(self.scene_sizes)]

    def _drawn(self, scene: Scene, size: Optional[Tuple[int, int]]) -> torch.Tensor:
        if size is None:
            drawn = draw_scene(scene, self.image_size)
            return normalise_images([drawn], self.image_size, self.mean, self.std)[0]
        drawn = draw_scene(scene, size)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (drawn.float() - mean) / std  # as normalise_native_images does in training

    def pack(self, images: Sequence[torch.Tensor]) -> PackedImages:
        """``image``'s results as the model takes them: ``[n, c, S, S]`` and no grids, or
        at native resolution packed patches ``[total_patches, c*p*p]`` and ``[n, 2]`` grids."""
        if self.native is not None:
            return self.native.pack(images)
        return torch.stack(list(images)), None

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
        examples = [*demos, query]
        ids: List[int] = [self.tokenizer.bos_token_id]
        for index, piece in enumerate(pieces):
            if index > 0:
                ids += self.visual_ids(examples[index - 1])
            if piece.strip():
                ids += self.tokenizer.encode(piece)
        ids = expand_image_placeholders(
            ids,
            image_token_id=self.tokenizer.image_token_id,
            num_image_tokens=self.num_image_tokens,
        )
        images, grids = self.pack([image for e in examples for image in self.images(e)])
        return Prompt(token_ids=ids, images=images, image_grids=grids)
