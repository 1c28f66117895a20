"""The input contract for sequences that mix text, images and several packed documents.

A packed sequence is described by per-position tensors of shape ``[b, s]``:

- ``tokens``: token ids. Each image occupies ``num_image_tokens`` consecutive
  positions holding ``image_token_id``; the connector's outputs replace their embeddings
  in order of appearance (row-major over the batch).
- ``document_ids``: which packed document a position belongs to. Attention never
  crosses documents and ``position_ids`` restart at 0 in each one. Padding is one more
  document whose positions carry no loss.
- ``labels`` / ``loss_mask``: next-token targets; the loss covers only positions whose
  target is a text token of the same document (never an image position or padding).

Images travel beside them, in order of appearance (row-major over the batch):

- ``images``: ``[n, c, S, S]`` normalised pixels, one square per image; or, with
  ``model.vision.native_resolution``, every image's patches packed into one
  ``[total_patches, c * p * p]`` tensor (each image ``rows * cols`` rows in Siglip2's patch
  layout, ``image_patches.py``), then
- ``image_grids``: ``[n, 2]`` int64 ``(rows, cols)`` per image, on the host (the ViT lays
  out its packed sequence from them without reading the device). Image ``i`` is rows
  ``sum(rows_j * cols_j for j < i)`` onward of ``images``. ``num_images`` (``[b]``)
  counts each sequence's images in both forms.

Either way each image becomes ``num_image_tokens`` tokens, so the text side is the same.

These functions are pure tensor code, shared by the data pipeline (which builds batches)
and the model (which merges image embeddings); this package imports neither.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def expand_image_placeholders(
    token_ids: Sequence[int], *, image_token_id: int, num_image_tokens: int
) -> List[int]:
    """Replace each single ``image_token_id`` by ``num_image_tokens`` copies of it."""
    expanded: List[int] = []
    for token in token_ids:
        expanded.extend([token] * num_image_tokens if token == image_token_id else [token])
    return expanded


def labels_and_loss_mask(
    tokens: torch.Tensor,
    document_ids: torch.Tensor,
    *,
    image_token_id: int,
    pad_token_id: int,
    trainable: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Next-token labels and a loss mask that is 1 only for text targets in the same doc.

    ``trainable`` (bool, like ``tokens``), when given, also limits the loss to targets
    whose token is marked trainable: a conversation's assistant turns, say.
    """
    labels = torch.full_like(tokens, pad_token_id)
    labels[..., :-1] = tokens[..., 1:]
    same_document = torch.zeros_like(tokens, dtype=torch.bool)
    same_document[..., :-1] = document_ids[..., 1:] == document_ids[..., :-1]
    text_target = (labels != image_token_id) & (labels != pad_token_id)
    mask = same_document & text_target
    if trainable is not None:
        target_trainable = torch.zeros_like(mask)
        target_trainable[..., :-1] = trainable[..., 1:]
        mask &= target_trainable
    return labels, mask.float()


def expand_trainable(
    token_ids: Sequence[int],
    trainable: Sequence[bool],
    *,
    image_token_id: int,
    num_image_tokens: int,
) -> List[bool]:
    """``trainable`` flags following ``expand_image_placeholders`` (images: never)."""
    if len(trainable) != len(token_ids):
        raise AssertionError(f"{len(trainable)} flags for {len(token_ids)} tokens")
    expanded: List[bool] = []
    for token, flag in zip(token_ids, trainable):
        if token == image_token_id:
            expanded.extend([False] * num_image_tokens)
        else:
            expanded.append(bool(flag))
    return expanded


def position_ids_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions counted from the start of each document: ``[b, s]`` -> ``[b, s]``."""
    seq_len = document_ids.shape[-1]
    index = torch.arange(seq_len, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index))
    return index - torch.cummax(start_index, dim=-1).values


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[b, 1, s, s]`` mask, True where attention is *blocked* (Megatron's convention).

    A query may attend to keys at or before it within its own document.
    """
    seq_len = document_ids.shape[-1]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    return ~(same_document & causal).unsqueeze(1)


def merge_image_embeddings(
    text_embeddings: torch.Tensor,
    image_embeddings: torch.Tensor,
    tokens: torch.Tensor,
    *,
    image_token_id: int,
) -> torch.Tensor:
    """Place image tokens into the ``[s, b, h]`` text embeddings at the image positions.

    ``image_embeddings`` is ``[num_images, tokens_per_image, h]`` in order of appearance.
    """
    # Order of appearance: walk [b, s] row-major; embeddings are indexed [s, b].
    batch_major = (tokens == image_token_id).nonzero(as_tuple=False)  # rows of (b, s)
    num_slots = batch_major.shape[0]
    flat_images = image_embeddings.reshape(-1, image_embeddings.shape[-1])
    if num_slots != flat_images.shape[0]:
        raise ValueError(
            f"batch has {num_slots} image-token positions but the connector "
            f"produced {flat_images.shape[0]} image tokens; each image needs "
            f"exactly num_output_tokens placeholders"
        )
    merged = text_embeddings.clone()
    merged[batch_major[:, 1], batch_major[:, 0]] = flat_images.to(merged.dtype)
    return merged
