"""Prompts for generation and their left-padded batch.

Rows are left-padded so every prompt ends at the same position and generated tokens line
up. Padding is its own document (id 0) and the prompt is document 1, so the per-document
attention keeps padding out of every prompt token's view: no attention mask is built, and
RoPE, being relative, gives the same scores as an unpadded prompt.

Images travel as in a training micro-batch (``batch/contract.py``): ``[n, c, S, S]``
squares, or for a native-resolution model (``model.vision.native_resolution``) packed
patches ``[total_patches, c * p * p]`` with their host ``image_grids`` ``[n, 2]``. The
batch holds every prompt's images in row order, the order the model fills the image
placeholders in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

PAD_DOCUMENT, PROMPT_DOCUMENT = 0, 1


@dataclass(frozen=True)
class Prompt:
    """Token ids with each image's placeholders already expanded (``num_image_tokens``
    copies of the image token per image), and the images in order of appearance:
    ``[n, c, H, W]``, or packed patches ``[total_patches, c * p * p]`` with
    ``image_grids``, each image's ``(rows, cols)`` of patches (``[n, 2]``, on the host)."""

    token_ids: List[int]
    images: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, 1, 1))
    image_grids: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("a prompt needs at least one token")
        if self.image_grids is not None:
            grids = torch.as_tensor(self.image_grids, dtype=torch.long)
            check_packed_images(self.images, grids)
            object.__setattr__(self, "image_grids", grids)

    @property
    def num_images(self) -> int:
        if self.image_grids is not None:
            return self.image_grids.shape[0]
        return self.images.shape[0]


def check_packed_images(images: torch.Tensor, grids: torch.Tensor) -> None:
    """``images`` are the packed patches of ``grids``' images, the grids on the host."""
    if grids.device.type != "cpu" or grids.dim() != 2 or grids.shape[1] != 2:
        raise ValueError(
            f"image_grids of shape {tuple(grids.shape)} on {grids.device}: give one "
            f"(rows, cols) pair per image, [n, 2] on the host"
        )
    if bool((grids < 1).any()):
        raise ValueError(f"image_grids {grids.tolist()} hold an empty grid: each side >= 1")
    patches = int(grids.prod(dim=1).sum())
    if images.dim() != 2 or images.shape[0] != patches:
        raise ValueError(
            f"images of shape {tuple(images.shape)} are not the {patches} packed patches "
            f"[{patches}, c * p * p] that image_grids {grids.tolist()} describe; pack them "
            f"with NativeResolution.pack (data/pipeline/native_resolution.py)"
        )


@dataclass
class PromptBatch:
    tokens: torch.Tensor  # [b, s] left-padded
    document_ids: torch.Tensor  # [b, s]: 0 on padding, 1 on the prompt
    images: torch.Tensor  # every prompt's images, row by row: [n, c, H, W] or packed patches
    image_grids: Optional[torch.Tensor] = None  # packed patches: [n, 2] (rows, cols), host


def left_pad(prompts: Sequence[Prompt], *, pad_token_id: int) -> PromptBatch:
    if not prompts:
        raise ValueError("no prompts to generate from")
    length = max(len(p.token_ids) for p in prompts)
    tokens = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    documents = torch.full((len(prompts), length), PAD_DOCUMENT, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        start = length - len(prompt.token_ids)
        tokens[row, start:] = torch.tensor(prompt.token_ids, dtype=torch.long)
        documents[row, start:] = PROMPT_DOCUMENT
    images, grids = batch_images(prompts)
    return PromptBatch(tokens=tokens, document_ids=documents, images=images, image_grids=grids)


def batch_images(prompts: Sequence[Prompt]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Every prompt's images in row order, and their grids where they are packed patches."""
    with_images = [p for p in prompts if p.num_images > 0]
    if not with_images:
        return torch.empty(0), None
    packed = {p.image_grids is not None for p in with_images}
    if len(packed) > 1:
        raise ValueError(
            "some prompts hold [n, c, H, W] images and others packed patches with "
            "image_grids; build every prompt of a batch for the same model "
            "(model.vision.native_resolution)"
        )
    images = torch.cat([p.images for p in with_images])
    if packed == {False}:
        return images, None
    return images, torch.cat([p.image_grids for p in with_images])
