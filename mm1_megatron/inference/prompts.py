"""Prompts for generation and their left-padded batch.

Rows are left-padded so every prompt ends at the same position and generated tokens line
up. Padding is its own document (id 0) and the prompt is document 1, so the per-document
attention keeps padding out of every prompt token's view: no attention mask is built, and
RoPE, being relative, gives the same scores as an unpadded prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import torch

PAD_DOCUMENT, PROMPT_DOCUMENT = 0, 1


@dataclass(frozen=True)
class Prompt:
    """Token ids with each image's placeholders already expanded (``num_image_tokens``
    copies of the image token per image), and the images in order of appearance."""

    token_ids: List[int]
    images: torch.Tensor = field(default_factory=lambda: torch.empty(0, 3, 1, 1))

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("a prompt needs at least one token")


@dataclass
class PromptBatch:
    tokens: torch.Tensor  # [b, s] left-padded
    document_ids: torch.Tensor  # [b, s]: 0 on padding, 1 on the prompt
    images: torch.Tensor  # [n, c, H, W]: every prompt's images, row by row


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
    with_images = [p.images for p in prompts if p.images.shape[0] > 0]
    images = torch.cat(with_images) if with_images else torch.empty(0)
    return PromptBatch(tokens=tokens, document_ids=documents, images=images)
