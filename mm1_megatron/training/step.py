"""The forward step and loss that Megatron-Core's pipeline schedules call, as functions any
loop (training, validation, evaluation) can use.

Loss contract (``calculate_per_token_loss``): the loss function returns the *sum* of the
per-token losses over the micro-batch's text targets, the number of those tokens, and a
report of ``[sum, count]`` pairs per source; Megatron-Core divides by the global token
count, so gradient accumulation and data parallelism give the update of one large batch.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

from mm1_megatron.batch import DocumentSplit, run_model
from mm1_megatron.config.context_parallel_checks import thd_context_parallel, thd_token_multiple
from mm1_megatron.data import SOURCE_IDS

Batch = Dict[str, torch.Tensor]
LossFunc = Callable[[Batch, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Dict]]


def loss_and_report(batch: Batch, per_token_loss: torch.Tensor):
    """``(loss_sum, num_tokens, report)`` over the loss-masked tokens, per source too."""
    mask = batch["loss_mask"].float()
    token_losses = per_token_loss.float() * mask
    loss_sum, num_tokens = token_losses.sum(), mask.sum()
    report = {"loss": torch.stack([loss_sum.detach(), num_tokens])}
    for name, source_id in SOURCE_IDS.items():
        rows = batch["source_ids"] == source_id
        report[f"loss/{name}"] = torch.stack([token_losses[rows].sum().detach(), mask[rows].sum()])
    return loss_sum, num_tokens.int(), report


def document_split(cfg, tokenizer) -> Optional[DocumentSplit]:
    """How ``model_inputs`` lays out this run's micro-batches for Transformer Engine's THD
    context parallelism; None where rows are split whole (local path, or no CP)."""
    if not thd_context_parallel(cfg):
        return None
    if tokenizer.pad_token_id == tokenizer.image_token_id:
        raise ValueError(
            f"the tokenizer's pad token is its image token ({tokenizer.pad_token_id}); "
            "context parallelism pads documents with it, so they must differ"
        )
    return DocumentSplit(
        pad_token_id=tokenizer.pad_token_id, token_multiple=thd_token_multiple(cfg)
    )


def forward_step(data_iterator: Iterator[Batch], model, *, loss_func: LossFunc = loss_and_report):
    """One micro-batch (already ``model_inputs``) through ``model``; Megatron-Core's
    ``forward_step_func`` contract: the output and the loss function to apply to it."""
    inputs = next(data_iterator)
    return run_model(model, inputs), partial(loss_func, inputs)
