"""Pack preference pairs into a sequence (the ``preference`` source, for DPO).

A pair is two conversations with the same images and prompt, the chosen answer and the
rejected one, each a ``Sample`` whose trainable flags mark its last answer. Whole pairs
are appended, the chosen conversation then the rejected one, each its own document, while
both fit (``seq_length`` tokens, ``max_images`` images); so document ``2k`` is pair
``k``'s chosen answer and ``2k + 1`` its rejected one, no pair is split across sequences
(or micro-batches), and no token attends across a document. The pair that does not fit
is dropped, as the caption source drops its sample; a pair too long for an empty
sequence is skipped (``too_long``). ``training/preference.py`` reads the pairs back from
``document_ids``.
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

from mm1_megatron.batch.contract import expand_image_placeholders
from mm1_megatron.data.pipeline.native_resolution import NativeResolution
from mm1_megatron.data.pipeline.packing import (
    MAX_CONSECUTIVE_SKIPS,
    Document,
    PackedSequence,
    Sample,
    assemble_documents,
    expanded_trainable,
)
from mm1_megatron.data.shards.skips import DataStats
from mm1_megatron.data.tokenizers.base import Tokenizer

SOURCE = "preference"
Pair = Tuple[Sample, Sample]  # (chosen, rejected)


def _document(sample: Sample, image_token_id: int, num_image_tokens: int) -> Document:
    if sample.trainable is None:
        raise AssertionError("a preference answer needs trainable flags (its answer's)")
    tokens = expand_image_placeholders(
        sample.token_ids, image_token_id=image_token_id, num_image_tokens=num_image_tokens
    )
    return tokens, list(sample.images), expanded_trainable(sample, image_token_id, num_image_tokens)


def preference_documents(
    pairs: Iterable[Pair],
    *,
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    image_token_id: int,
    stats: Optional[DataStats] = None,
) -> List[Document]:
    """The documents of one sequence: chosen, rejected, chosen, rejected, ..."""
    stats = stats if stats is not None else DataStats()
    documents: List[Document] = []
    num_tokens = num_images = num_skips = 0
    for pair in pairs:
        pair_documents = [_document(s, image_token_id, num_image_tokens) for s in pair]
        tokens = sum(len(d[0]) for d in pair_documents)
        images = sum(len(d[1]) for d in pair_documents)
        if num_tokens + tokens <= seq_length and num_images + images <= max_images:
            documents += pair_documents
            num_tokens, num_images, num_skips = num_tokens + tokens, num_images + images, 0
            if num_tokens == seq_length:
                return documents
            continue
        if documents:
            return documents  # the pair that does not fit is dropped
        stats.add("too_long")
        num_skips += 1
        if num_skips >= MAX_CONSECUTIVE_SKIPS:
            raise ValueError(
                f"{num_skips} preference pairs in a row did not fit in an empty sequence "
                f"(seq_length={seq_length}, max_images={max_images}, a pair counts both "
                "answers with their images); raise seq_length or max_images_per_sequence"
            )
    raise AssertionError("the pair stream ended")


def pack_preference_pairs(
    pairs: Iterator[Pair],
    *,
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    tokenizer: Tokenizer,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    stats: Optional[DataStats] = None,
    native: Optional[NativeResolution] = None,
) -> PackedSequence:
    documents = preference_documents(
        pairs,
        seq_length=seq_length,
        num_image_tokens=num_image_tokens,
        max_images=max_images,
        image_token_id=tokenizer.image_token_id,
        stats=stats,
    )
    return assemble_documents(
        documents,
        source=SOURCE,
        seq_length=seq_length,
        tokenizer=tokenizer,
        image_size=image_size,
        image_mean=image_mean,
        image_std=image_std,
        native=native,
    )
