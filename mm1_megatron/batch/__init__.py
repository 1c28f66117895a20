"""The micro-batch contract, shared by ``data`` (which builds batches) and ``models``
(which consumes them); it imports neither."""

from mm1_megatron.batch.contract import (
    document_causal_mask,
    expand_image_placeholders,
    labels_and_loss_mask,
    merge_image_embeddings,
    position_ids_from_documents,
)
from mm1_megatron.batch.document_split import DocumentSplit
from mm1_megatron.batch.model_inputs import model_inputs, run_model

__all__ = [
    "DocumentSplit",
    "document_causal_mask",
    "expand_image_placeholders",
    "labels_and_loss_mask",
    "merge_image_embeddings",
    "model_inputs",
    "position_ids_from_documents",
    "run_model",
]
