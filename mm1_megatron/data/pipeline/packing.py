"""Pack samples of one source into a fixed-length sequence (the contract of ``batch/contract``).

Each image placeholder becomes ``num_image_tokens`` image tokens. The rules:

- ``caption`` / ``text``: whole samples are appended, each as its own document, until the
  next sample would exceed ``seq_length`` tokens or ``max_images`` images. That sample is
  dropped, not carried over (each sequence reads its own stream, so sequences stay
  independent of each other). A sample too long even for an empty sequence is truncated
  to ``seq_length`` tokens if it has no images (it then has no eos), and skipped if it has
  images; ``MAX_CONSECUTIVE_SKIPS`` skips in a row raise ``ValueError``.
- ``interleaved``: one document per sequence. Reading left to right, the document ends just
  before the first token that does not fit in ``seq_length`` or the first image beyond
  ``max_images``; so an image's tokens are never split and dropped images take their
  placeholder and all later text with them. Images left at the very end of a cut document
  are dropped too (nothing after them would use them).
- The rest is padding: pad tokens forming one more document, which no real position can
  attend to and which carries no loss.

Labels and loss mask come from ``labels_and_loss_mask`` (loss only on text targets in the
same document), positions restart at 0 in each document. Images are normalised per
channel as ``(x - mean) / std``; at native resolution (``native``) they are then packed
into patches with their grids (``native_resolution.py``). Packing is greedy and in
order: it cannot reorder samples to fill gaps, so some room is left as padding
(``num_real_tokens`` measures the fill).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mm1_megatron.batch.contract import (
    expand_image_placeholders,
    expand_trainable,
    labels_and_loss_mask,
    position_ids_from_documents,
)
from mm1_megatron.data.pipeline.balance import SequenceCost, document_pairs
from mm1_megatron.data.pipeline.native_resolution import (
    NativeResolution,
    normalise_native_images,
)
from mm1_megatron.data.shards.skips import DataStats
from mm1_megatron.data.tokenizers.base import Tokenizer

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_SKIPS = 100


class ImageShape(NamedTuple):
    """An image that is not drawn or decoded, only its size: what planning a sequence's
    cost (``sequence_cost``) packs in place of pixels."""

    height: int
    width: int


Image = Union[torch.Tensor, ImageShape]  # [3, H, W] pixels, or only their size


def image_height_width(image: Image) -> Tuple[int, int]:
    if isinstance(image, ImageShape):
        return image.height, image.width
    return int(image.shape[-2]), int(image.shape[-1])


# (expanded tokens, their trainable flags) -> a shorter version that fits, or None.
FitOverlong = Callable[[List[int], List[bool]], Optional[Tuple[List[int], List[bool]]]]
# Expanded token ids, images, and per-token trainable flags (None: every text token).
Document = Tuple[List[int], List[torch.Tensor], Optional[List[bool]]]


@dataclass
class Sample:
    """One document: ``token_ids`` holds one ``image_token_id`` per entry of ``images``."""

    source: str
    token_ids: List[int]
    images: List[torch.Tensor]  # each [3, H, W] float32 in [0, 1]; H = W = S unless native
    # Per entry of token_ids: may it be a loss target (a conversation's assistant turns)?
    # None: every text token may, as in pre-training.
    trainable: Optional[List[bool]] = None


@dataclass
class PackedSequence:
    tokens: torch.Tensor  # [s] long
    labels: torch.Tensor  # [s] long
    loss_mask: torch.Tensor  # [s] float
    position_ids: torch.Tensor  # [s] long
    document_ids: torch.Tensor  # [s] long
    # Normalised, float32 (or bf16): [num_images, 3, S, S], or at native resolution the
    # packed patches [total_patches, 3 * p * p] of images whose grids are image_grids.
    images: torch.Tensor
    source: str
    num_real_tokens: int  # positions that are not padding
    image_grids: Optional[torch.Tensor] = None  # native resolution: [num_images, 2] int64

    @property
    def num_images(self) -> int:
        if self.image_grids is not None:
            return int(self.image_grids.shape[0])
        return int(self.images.shape[0])


def pack_sequence(
    samples: Iterable[Sample],
    *,
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    tokenizer: Tokenizer,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    one_per_sequence: bool = False,
    fit_overlong: Optional[FitOverlong] = None,
    stats: Optional[DataStats] = None,
    native: Optional[NativeResolution] = None,
) -> PackedSequence:
    """Pack samples drawn from ``samples`` (all of one source) into one sequence.

    Reads only as many samples as the sequence needs; see the module docstring for rules.
    ``one_per_sequence`` packs a single sample. ``fit_overlong`` shortens a sample with
    trainable flags (a conversation) that does not fit an empty sequence, or returns None
    to skip it. ``stats`` counts skipped (``too_long``) and shortened samples. ``native``:
    the samples' images are at their native-resolution sizes, packed as patches.
    """
    check_packing_arguments(seq_length, num_image_tokens, max_images, image_mean, image_std)
    source, documents = pack_documents(
        samples,
        seq_length=seq_length,
        num_image_tokens=num_image_tokens,
        max_images=max_images,
        image_token_id=tokenizer.image_token_id,
        one_per_sequence=one_per_sequence,
        fit_overlong=fit_overlong,
        stats=stats,
    )
    return assemble_documents(
        documents,
        source=source,
        seq_length=seq_length,
        tokenizer=tokenizer,
        image_size=image_size,
        image_mean=image_mean,
        image_std=image_std,
        native=native,
    )


def assemble_documents(
    documents: Sequence[Document],
    *,
    source: str,
    seq_length: int,
    tokenizer: Tokenizer,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    native: Optional[NativeResolution] = None,
) -> PackedSequence:
    """One sequence of ``documents`` (``pack_documents``' choice), images normalised."""
    images = [image for _, document_images, _ in documents for image in document_images]
    pixels, grids = normalised_images(images, image_size, image_mean, image_std, native)
    return assemble(
        [tokens for tokens, _, _ in documents],
        source=source,
        seq_length=seq_length,
        tokenizer=tokenizer,
        images=pixels,
        image_grids=grids,
        trainable=[flags for _, _, flags in documents],
    )


def pack_documents(
    samples: Iterable[Sample],
    *,
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    image_token_id: int,
    one_per_sequence: bool = False,
    fit_overlong: Optional[FitOverlong] = None,
    stats: Optional[DataStats] = None,
) -> Tuple[str, List[Document]]:
    """What ``pack_sequence`` decides (its source and documents), nothing built: the
    documents keep their samples' images as they are (pixels or ``ImageShape``)."""
    iterator = iter(samples)
    first = next(iterator)
    if first.source == "interleaved":
        return first.source, [
            _fit_interleaved(first, seq_length, num_image_tokens, max_images, image_token_id)
        ]
    return first.source, _fill_with_whole_samples(
        first,
        iterator,
        _Limits(seq_length, num_image_tokens, max_images, image_token_id),
        one_per_sequence=one_per_sequence,
        fit_overlong=fit_overlong,
        stats=stats if stats is not None else DataStats(),
    )


def documents_cost(
    documents: Sequence[Tuple[Sequence[int], Sequence[Image]]], patch_size: Optional[int]
) -> SequenceCost:
    """The ``balance.SequenceCost`` of packed documents (expanded tokens, their images);
    ``patch_size`` at native resolution, where each image is at its rule size."""
    images = [image for _, document_images, *_ in documents for image in document_images]
    patches = []
    if patch_size is not None:
        for image in images:
            height, width = image_height_width(image)
            patches.append((height // patch_size) * (width // patch_size))
    return SequenceCost(
        encoder_inputs=len(images),
        patches=sum(patches),
        patch_pairs=sum(n * n for n in patches),
        attention_pairs=document_pairs([len(tokens) for tokens, *_ in documents]),
    )


def check_packing_arguments(
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> None:
    """Raise ``ValueError`` for settings no sequence could be packed with."""
    if seq_length < 2:
        raise ValueError(f"seq_length={seq_length} must be >= 2")
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens={num_image_tokens} must be >= 1")
    if max_images < 0:
        raise ValueError(f"max_images={max_images} must be >= 0")
    if len(image_mean) != 3 or len(image_std) != 3:
        raise ValueError(
            f"image_mean and image_std need 3 values (RGB), got "
            f"{list(image_mean)} and {list(image_std)}"
        )
    if min(image_std) <= 0:
        raise ValueError(f"image_std={list(image_std)} must be > 0")


@dataclass(frozen=True)
class _Limits:
    seq_length: int
    num_image_tokens: int
    max_images: int
    image_token_id: int


def _fill_with_whole_samples(
    first: Sample,
    rest: Iterator[Sample],
    limits: _Limits,
    *,
    one_per_sequence: bool,
    fit_overlong: Optional[FitOverlong],
    stats: DataStats,
) -> List[Document]:
    seq_length, image_token_id = limits.seq_length, limits.image_token_id
    documents: List[Document] = []
    num_tokens = num_images = num_skips = 0
    sample = first
    while True:
        _check_same_source(first, sample)
        tokens = expand_image_placeholders(
            sample.token_ids,
            image_token_id=image_token_id,
            num_image_tokens=limits.num_image_tokens,
        )
        trainable = expanded_trainable(sample, image_token_id, limits.num_image_tokens)
        fits = (
            num_tokens + len(tokens) <= seq_length
            and num_images + len(sample.images) <= limits.max_images
        )
        if fits:
            documents.append((tokens, list(sample.images), trainable))
            num_tokens, num_images, num_skips = (
                num_tokens + len(tokens),
                num_images + len(sample.images),
                0,
            )
        elif documents:
            return documents  # the sample that does not fit is dropped
        elif trainable is not None and fit_overlong is not None:
            fitted = fit_overlong(tokens, trainable)
            if fitted is not None:
                stats.add("shortened_conversations")
                kept_images = fitted[0].count(image_token_id) // limits.num_image_tokens
                return [(fitted[0], list(sample.images[:kept_images]), fitted[1])]
            stats.add("too_long")
            num_skips += 1
        elif not sample.images:
            logger.debug(
                "truncating a %d-token %s sample to %d", len(tokens), sample.source, seq_length
            )
            return [(tokens[:seq_length], [], trainable and trainable[:seq_length])]
        else:
            stats.add("too_long")
            logger.debug(
                "skipping a %s sample: %d tokens, %d images",
                sample.source,
                len(tokens),
                len(sample.images),
            )
            num_skips += 1
        if documents and (one_per_sequence or num_tokens == seq_length):
            return documents
        _check_skips(num_skips, sample, limits)
        sample = next(rest)


def _check_skips(num_skips: int, sample: Sample, limits: _Limits) -> None:
    if num_skips >= MAX_CONSECUTIVE_SKIPS:
        raise ValueError(
            f"{num_skips} {sample.source} samples in a row did not fit in an empty "
            f"sequence (seq_length={limits.seq_length}, max_images={limits.max_images}, "
            f"num_image_tokens={limits.num_image_tokens}); raise seq_length or "
            f"max_images_per_sequence"
        )


def expanded_trainable(
    sample: Sample, image_token_id: int, num_image_tokens: int
) -> Optional[List[bool]]:
    if sample.trainable is None:
        return None
    return expand_trainable(
        sample.token_ids,
        sample.trainable,
        image_token_id=image_token_id,
        num_image_tokens=num_image_tokens,
    )


def _check_same_source(first: Sample, sample: Sample) -> None:
    if sample.source != first.source:
        raise ValueError(
            f"a sequence packs one source, but got {sample.source!r} samples "
            f"after {first.source!r} ones"
        )


def _fit_interleaved(
    sample: Sample, seq_length: int, num_image_tokens: int, max_images: int, image_token_id: int
) -> Document:
    if sample.trainable is not None:
        raise AssertionError("interleaved samples train on every text token")
    kept, num_images = cut_interleaved(
        sample.token_ids,
        seq_length=seq_length,
        num_image_tokens=num_image_tokens,
        max_images=max_images,
        image_token_id=image_token_id,
    )
    tokens = expand_image_placeholders(
        kept, image_token_id=image_token_id, num_image_tokens=num_image_tokens
    )
    return tokens, list(sample.images[:num_images]), None


def cut_interleaved(
    token_ids: Sequence[int],
    *,
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    image_token_id: int,
) -> Tuple[List[int], int]:
    """The interleaved cut rule (module docstring): kept placeholder ids and image count.

    ``token_ids`` holds one ``image_token_id`` per image; the kept prefix keeps that form.
    """
    kept: List[int] = []
    num_tokens = num_images = 0
    for token in token_ids:
        is_image = token == image_token_id
        cost = num_image_tokens if is_image else 1
        if num_tokens + cost > seq_length or (is_image and num_images == max_images):
            while kept and kept[-1] == image_token_id:  # a cut right after an image
                kept.pop()
                num_images -= 1
            break
        kept.append(token)
        num_tokens += cost
        num_images += int(is_image)
    return kept, num_images


def assemble(
    documents: Sequence[Sequence[int]],
    *,
    source: str,
    seq_length: int,
    tokenizer: Tokenizer,
    images: torch.Tensor,
    image_grids: Optional[torch.Tensor] = None,
    trainable: Optional[Sequence[Optional[List[bool]]]] = None,
) -> PackedSequence:
    """One sequence from documents of expanded token ids and their ``[n, 3, H, W]`` images
    (or, with ``image_grids``, their packed patches).

    ``images`` are already normalised, in order of appearance. Padding fills the rest.
    ``trainable`` gives, per document, its tokens' trainable flags (None: all of them).
    """
    token_list: List[int] = []
    document_list: List[int] = []
    for document_id, tokens in enumerate(documents):
        token_list += tokens
        document_list += [document_id] * len(tokens)
    num_real_tokens = len(token_list)
    if num_real_tokens > seq_length:
        raise AssertionError(f"{num_real_tokens} tokens packed into a {seq_length}-token sequence")
    num_padding = seq_length - num_real_tokens
    token_list += [tokenizer.pad_token_id] * num_padding
    document_list += [len(documents)] * num_padding
    tokens = torch.tensor(token_list, dtype=torch.long)
    document_ids = torch.tensor(document_list, dtype=torch.long)
    labels, loss_mask = labels_and_loss_mask(
        tokens,
        document_ids,
        image_token_id=tokenizer.image_token_id,
        pad_token_id=tokenizer.pad_token_id,
        trainable=_trainable_tensor(documents, trainable, seq_length),
    )
    return PackedSequence(
        tokens=tokens,
        labels=labels,
        loss_mask=loss_mask,
        position_ids=position_ids_from_documents(document_ids),
        document_ids=document_ids,
        images=images,
        source=source,
        num_real_tokens=num_real_tokens,
        image_grids=image_grids,
    )


def normalised_images(
    images: Sequence[torch.Tensor],
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    native: Optional[NativeResolution],
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A sequence's images and, at native resolution, their grids."""
    if native is None:
        return normalise_images(images, image_size, image_mean, image_std), None
    return normalise_native_images(images, native, image_mean, image_std)


def normalise_images(
    images: Sequence[torch.Tensor],
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> torch.Tensor:
    """Stack ``[3, H, W]`` images in [0, 1] into ``[n, 3, H, W]`` and apply ``(x-mean)/std``."""
    expected = (3, image_size, image_size)
    for image in images:
        if tuple(image.shape) != expected:
            raise ValueError(
                f"image of shape {tuple(image.shape)} does not match "
                f"image_size={image_size}: expected {expected}"
            )
    if not images:
        return torch.zeros((0, *expected), dtype=torch.float32)
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    return (torch.stack(images).float() - mean) / std


def _trainable_tensor(
    documents: Sequence[Sequence[int]],
    trainable: Optional[Sequence[Optional[List[bool]]]],
    seq_length: int,
) -> Optional[torch.Tensor]:
    """Per-position flags when some document has its own; None when none has."""
    if trainable is None or all(flags is None for flags in trainable):
        return None
    flat: List[bool] = []
    for tokens, flags in zip(documents, trainable):
        flat += [True] * len(tokens) if flags is None else list(flags)
    flat += [False] * (seq_length - len(flat))
    return torch.tensor(flat, dtype=torch.bool)
