"""DPO's reference model and the pass that scores each step's pairs with it.

The reference is the model training started from. Two ways to have it, chosen by what
the run trains:

- with LoRA (``model.lora``) it is the policy itself with its adapters switched off
  (``models/lora.adapters_disabled``): no memory at all;
- without, a frozen copy of the starting weights (``checkpoint.initial_weights``, read
  again on a resume): one more set of weights (2 bytes per parameter in bf16, against
  the 16 that training holds per parameter), no gradients or optimizer.

Either way the reference's log probabilities are computed online: before each step, one
forward-only pass of Megatron-Core's schedule over the step's micro-batches (any layout,
pipeline stages included) keeps each micro-batch's document log probabilities on the last
stage, where the loss reads them (``reference_logps``). The alternative, scoring the whole
dataset once and storing the numbers with the data, saves that forward pass (a quarter of
a step's compute) but ties the data to one reference and one tokenisation; it is not done.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from mm1_megatron.batch import model_inputs
from mm1_megatron.checkpoint import load_model_weights, unwrap
from mm1_megatron.models.lora import adapters_disabled
from mm1_megatron.training.preference import reference_logps
from mm1_megatron.training.step import forward_step

REFERENCE_KEY = "reference_logps"


class ReferenceModel:
    def __init__(
        self,
        policy_chunks: List,
        *,
        lora: bool,
        build: Callable,
        bf16: bool,
        initial_weights: Optional[Path],
    ):
        """``build()``: a model like the policy's (this stage's part), before wrapping.
        Without LoRA the frozen copy is ``initial_weights`` (read again: a resumed policy
        holds trained weights), or without them the policy as built (its seeded start)."""
        self.policy_chunks = policy_chunks
        self.frozen_chunks = None
        if not lora:
            self.frozen_chunks = [
                self._frozen_copy(chunk, build, bf16, initial_weights) for chunk in policy_chunks
            ]

    @staticmethod
    def _frozen_copy(policy_chunk, build: Callable, bf16: bool, initial_weights):
        model = build()
        if initial_weights is not None:
            load_model_weights(model, initial_weights)
        else:
            model.load_state_dict(unwrap(policy_chunk).state_dict())
        model.requires_grad_(False)
        model = model.to(next(unwrap(policy_chunk).parameters()).device)
        if bf16:
            model = Float16Module(model.config, model)
        return model.eval()

    @contextlib.contextmanager
    def _chunks(self) -> Iterator[List]:
        if self.frozen_chunks is not None:
            yield self.frozen_chunks
            return
        with contextlib.ExitStack() as stack:
            for chunk in self.policy_chunks:
                stack.enter_context(adapters_disabled(chunk))
            yield self.policy_chunks

    def score(
        self,
        host_batches: List[Dict[str, torch.Tensor]],
        *,
        device: torch.device,
        seq_length: int,
        micro_batch_size: int,
    ) -> None:
        """Add ``reference_logps`` (``[b, s]``, per document) to each micro-batch on the
        last pipeline stage: one forward-only pass of the reference."""
        with_images = parallel_state.is_pipeline_first_stage()
        batches = (model_inputs(b, device, images=with_images) for b in host_batches)
        with self._chunks() as chunks, torch.no_grad():
            scores = get_forward_backward_func()(
                forward_step_func=_reference_step,
                data_iterator=batches,
                model=chunks,
                num_microbatches=len(host_batches),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=True,
                collect_non_loss_data=True,
            )
        if parallel_state.is_pipeline_last_stage():
            assert len(scores) == len(host_batches)
            for batch, score in zip(host_batches, scores):
                batch[REFERENCE_KEY] = score


def _reference_step(data_iterator, model):
    return forward_step(data_iterator, model, loss_func=reference_logps)
