"""One forward pass of the cached model, at any TP/PP/EP layout.

Megatron-Core's ``StaticInferenceContext`` holds the KV cache: each attention layer
stores its keys and values at ``sequence_len_offset`` and attends over everything cached
so far; RoPE continues from the offset. This module adds what a multimodal, pipelined
model needs around it: images go to the first stage only (encoded once, in the prefill;
at native resolution with their host ``image_grids``, which the ViT reads there),
hidden states travel stage to stage point-to-point, the last stage returns the
whole-vocabulary logits of the last position, and the tokens every stage must feed next
come back from the last stage by broadcast (``broadcast_from_last_stage``).

A decode step hands the model, in place of the document ids, the ``[b, 1, sq, sk]``
boolean mask they imply (``visible_keys``): every layer's attention reads it as it is,
where from the ids each layer would build it again. When every position of every row is
in one document (prompts of equal length: no padding), a decode step of one token hides
nothing, and the mask is the 0-dimensional ``ALL_VISIBLE``: attention without a mask.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from mm1_megatron.parallel.collectives import broadcast_, recv_, send

ALL_VISIBLE = torch.tensor(True, device="cpu")  # see models.attention.attention_against_cache


def visible_keys(document_ids: torch.Tensor, new: int) -> torch.Tensor:
    """``[b, 1, new, sk]``: which of ``document_ids``' ``sk`` positions each of the last
    ``new`` may attend to (its own document, not later positions), the mask
    ``models.attention.attention_against_cache`` builds from the ids."""
    sk = document_ids.shape[1]
    mask = document_ids[:, sk - new :, None] == document_ids[:, None, :]
    if new > 1:  # one new position sees every cached one: causal already
        positions = torch.arange(sk, device=document_ids.device)
        mask = mask & (positions[None, :] <= positions[sk - new :, None])
    return mask[:, None]


class CachedModelRunner:
    """Feeds new positions through ``model`` (one pipeline stage's ``MM1Model``) and
    returns, on the last stage, the logits of the next token."""

    def __init__(self, model, *, max_batch_size: int, max_sequence_length: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.hidden_size = model.config.hidden_size
        self.context = StaticInferenceContext(max_batch_size, max_sequence_length)
        self.is_first = parallel_state.is_pipeline_first_stage()
        self.is_last = parallel_state.is_pipeline_last_stage()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        self._ids, self._one_document = None, False  # the ids decode_mask last saw

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def forward(
        self,
        tokens: torch.Tensor,
        document_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
        image_grids: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """``tokens [B, sq]`` at positions ``offset .. offset+sq-1``; ``document_ids`` of
        every position up to there (at least); ``images`` (and, packed patches, their
        ``image_grids``) as ``PromptBatch`` holds them. Last stage: next-token logits
        ``[B, V]`` (fp32)."""
        batch, new = tokens.shape
        start = self.offset
        if self.pp_size > 1 and not self.is_first:
            hidden = torch.empty(new, batch, self.hidden_size, dtype=self.dtype, device=self.device)
            recv_(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        positions = torch.arange(start, start + new, device=self.device).expand(batch, new)
        images, native = self._images_for_this_stage(images, image_grids)
        if start > 0:  # decoding against the cache: one mask for every layer
            documents = self.decode_mask(document_ids, start + new, new)
        else:
            documents = document_ids[:, : start + new].to(self.device)
        output = self.model(
            tokens.to(self.device),
            positions,
            documents,
            images=images,
            inference_context=self.context,
            **native,
        )
        self.context.sequence_len_offset = start + new
        if not self.is_last:
            send(output, dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return output[:, -1, :].float()  # whole vocabulary

    def _images_for_this_stage(self, images, image_grids):
        """The images on the model's device, and the model's ``image_grids`` argument
        (left out for square images, as ``batch.run_model`` does); none on stages after
        the first, which encode no images. The grids stay on the host."""
        if images is None or not self.is_first or images.shape[0] == 0:
            return None, {}
        native = {} if image_grids is None else {"image_grids": image_grids}
        return images.to(self.device, self.dtype), native

    def decode_mask(self, document_ids: torch.Tensor, end: int, new: int) -> torch.Tensor:
        """The mask of the last ``new`` of ``end`` positions. ``document_ids`` (every
        position of the generation, the same tensor every step) are checked once for a
        single document per row."""
        if document_ids is not self._ids:
            self._ids = document_ids
            self._one_document = bool((document_ids == document_ids[:, -1:]).all())
        if self._one_document and new == 1:
            return ALL_VISIBLE
        return visible_keys(document_ids[:, :end].to(self.device), new)

    def reorder(self, rows: torch.Tensor) -> None:
        """Cache row ``i`` becomes old row ``rows[i]`` (beam search, beam expansion)."""
        self.context.swap_key_value_dict(rows.to(self.device))

    def broadcast_from_last_stage(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (int64, the same shape on every stage) as the last stage has them."""
        if self.pp_size == 1:
            return values
        return broadcast_(
            values.to(self.device),
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        ).cpu()
