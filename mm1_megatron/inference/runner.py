"""One forward pass of the cached model, at any TP/PP/EP layout.

Megatron-Core's ``StaticInferenceContext`` holds the KV cache: each attention layer
stores its keys and values at ``sequence_len_offset`` and attends over everything cached
so far; RoPE continues from the offset. This module adds what a multimodal, pipelined
model needs around it: images go to the first stage only (encoded once, in the prefill),
hidden states travel stage to stage point-to-point, the last stage returns
whole-vocabulary log-probabilities, and the tokens every stage must feed next come back from the
last stage by broadcast (``broadcast_from_last_stage``).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from mm1_megatron.parallel.collectives import broadcast_, recv_, send


class CachedModelRunner:
    """Feeds new positions through ``model`` (one pipeline stage's ``MM1Model``) and
    returns, on the last stage, the log-probabilities of the next token."""

    def __init__(self, model, *, max_batch_size: int, max_sequence_length: int):
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.hidden_size = model.config.hidden_size
        self.context = StaticInferenceContext(max_batch_size, max_sequence_length)
        self.is_first = parallel_state.is_pipeline_first_stage()
        self.is_last = parallel_state.is_pipeline_last_stage()
        self.pp_size = parallel_state.get_pipeline_model_parallel_world_size()

    @property
    def offset(self) -> int:
        return self.context.sequence_len_offset

    def forward(
        self,
        tokens: torch.Tensor,
        document_ids: torch.Tensor,
        images: Optional[torch.Tensor] = None,
    ) -> Optional[torch.Tensor]:
        """``tokens [B, sq]`` at positions ``offset .. offset+sq-1``; ``document_ids`` of
        every position up to there. Last stage: next-token log-probs ``[B, V]`` (fp32)."""
        batch, new = tokens.shape
        start = self.offset
        if self.pp_size > 1 and not self.is_first:
            hidden = torch.empty(new, batch, self.hidden_size, dtype=self.dtype, device=self.device)
            recv_(hidden, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.model.set_input_tensor(hidden)
        positions = torch.arange(start, start + new, device=self.device).expand(batch, new)
        if images is not None and self.is_first and images.shape[0] > 0:
            images = images.to(self.device, self.dtype)
        else:
            images = None
        output = self.model(
            tokens.to(self.device),
            positions,
            document_ids[:, : start + new].to(self.device),
            images=images,
            inference_context=self.context,
        )
        self.context.sequence_len_offset = start + new
        if not self.is_last:
            send(output, dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return torch.log_softmax(output[:, -1, :].float(), dim=-1)  # whole vocabulary

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
