"""From a micro-batch to the model's inputs, in one place.

Every loop that runs the model (training, benchmarks, and later validation and
evaluation) calls ``model_inputs`` and ``run_model`` instead of building masks or
argument lists itself, so a change of the attention interface (packed sequences) is made
here once.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

from mm1_megatron.batch.context_parallel import ContextShard, row_shard
from mm1_megatron.batch.document_split import DocumentSplit, split_documents
from mm1_megatron.batch.documents import register_host_document_ids

Batch = Dict[str, torch.Tensor]

IMAGE_KEYS = ("images", "image_grids")  # what only the stage that encodes images needs
HOST_KEYS = ("image_grids",)  # read by the host (the ViT's packing): never moved
# Per-token tensors that each context-parallel rank keeps only its share of. ``tokens`` and
# ``document_ids`` stay whole: the first stage reads the whole row to number the images
# whose tokens fall in its share, and attention needs every document's span.
SHARDED_KEYS = ("labels", "loss_mask", "position_ids")
THD_SHARDED_KEYS = (*SHARDED_KEYS, "source_ids")  # per token in the THD row


@lru_cache(maxsize=8)
def _row_shard(seq_length: int, size: int, rank: int) -> ContextShard:
    return row_shard(seq_length, size, rank)


def _context_parallel_rank() -> Optional[Tuple[int, int]]:
    """``(size, rank)`` of this rank's context-parallel group; None without context
    parallelism, or before Megatron-Core's groups exist."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return None
    return size, parallel_state.get_context_parallel_rank()


def context_shard(seq_length: int) -> Optional[ContextShard]:
    """This rank's share of ``seq_length``-token rows under context parallelism (None
    without it): the whole-row split."""
    group = _context_parallel_rank()
    return None if group is None else _row_shard(seq_length, *group)


def _shard(batch: Batch, split: Optional[DocumentSplit]) -> Tuple[Batch, Optional[ContextShard]]:
    if "tokens" not in batch:
        return batch, None
    if split is None:
        return batch, context_shard(batch["tokens"].shape[1])
    group = _context_parallel_rank()
    return (batch, None) if group is None else split_documents(batch, split, *group)


def model_inputs(
    batch: Batch,
    device: torch.device,
    *,
    images: bool = True,
    documents: Optional[DocumentSplit] = None,
) -> Batch:
    """The micro-batch on ``device``. Attention needs nothing more: the decoder reads the
    packed documents from ``document_ids`` (no ``[b, 1, s, s]`` mask is built).

    ``images=False`` leaves the pixels (and the native-resolution ``image_grids``) out:
    pipeline stages after the first never encode images, so they need not receive them.
    ``image_grids`` stay on the host, where the ViT reads them to lay out its packed
    sequence without a device sync.

    The documents' layout is computed here from the host ``document_ids`` and registered
    for their device copy, so no layer reads the ids back from the device.

    Under context parallelism the labels, loss mask and positions are this rank's share
    of each row (``context_shard``: the whole-row split), which the layout records for the
    model. With ``documents`` (Transformer Engine's THD path) the micro-batch is first
    laid out as one padded THD row (``document_split``) and shared per document; its
    source ids become per token, and are shared too.
    """
    if "tokens" in batch and batch["document_ids"].device.type != "cpu":
        if _context_parallel_rank() is not None:
            raise ValueError("context parallelism takes micro-batches on the host")
    batch, shard = _shard(batch, documents)
    sharded = SHARDED_KEYS if shard is None or shard.documents is None else THD_SHARDED_KEYS
    inputs = {}
    for key, value in batch.items():
        if key in IMAGE_KEYS and not images:
            continue
        if shard is not None and key in sharded:
            value = shard.take(value)
        inputs[key] = value if key in HOST_KEYS else value.to(device, non_blocking=True)
    if "document_ids" in inputs and batch["document_ids"].device.type == "cpu":
        register_host_document_ids(inputs["document_ids"], batch["document_ids"], shard)
    return inputs


def run_model(model, inputs: Batch, *, with_labels: bool = True) -> torch.Tensor:
    """``MM1Model.forward`` on ``model_inputs(...)``: per-token loss ``[b, s]`` with labels
    (last pipeline stage), else logits (last stage) or hidden states (other stages)."""
    native = {"image_grids": inputs["image_grids"]} if "image_grids" in inputs else {}
    return model(
        inputs["tokens"],
        inputs["position_ids"],
        inputs["document_ids"],
        images=inputs.get("images"),
        labels=inputs["labels"] if with_labels else None,
        **native,
    )
