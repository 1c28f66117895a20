"""Cost mode of the shard sources: a sequence's images as sizes, never as pixels.

``sequence_cost(k)`` of a source (``sources.py``) selects the documents of sequence ``k``
exactly as ``sequence(k)`` does (the same loads, fits, skips and replacements), but where
``sequence`` reads and decodes the accepted documents' images, ``measure_images`` gives
each image only the size the decoder would give it (``packing.ImageShape``):

- fixed size: ``S x S`` per image (``S`` = the decoder's ``image_size``), nothing read;
- tiling: ``S x S`` per tile of the image's plan (the plan is made while loading, from
  the image's header, as for ``sequence``);
- native resolution: the image's size by SigLIP 2's rule (``NativeResolution.image_size``)
  from its header (``images.image_size_of``): the blob is read, not decoded.

A cost must be the same in every process (the ranks plan with each other's costs, and a
resumed process replans the step it stopped in), so nothing here depends on what the
process decoded before: a sample whose images fail to decode counts as good, and so does
one whose blob is unreadable at a fixed size (nothing is read there). At native
resolution an image whose blob cannot be read or whose header is refused fails here, as
it would when decoded (the same in every process). Only decoding replaces a sample whose
pixels do not decode: the one case where the cost differs from the built sequence's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Sequence, Tuple

from mm1_megatron.data.pipeline.balance import SequenceCost
from mm1_megatron.data.pipeline.images import ImageDecoder, image_size_of
from mm1_megatron.data.pipeline.packing import ImageShape, documents_cost
from mm1_megatron.data.shards.skips import BadSample

if TYPE_CHECKING:  # sources.py imports this module
    from mm1_megatron.data.pipeline.sources import LoadedSample, ShardCorpus, ShardDocument


def measure_images(
    corpus: ShardCorpus,
    decoder: ImageDecoder,
    documents: Sequence[Tuple[int, ShardDocument]],
) -> Tuple[List[ShardDocument], List[ShardDocument]]:
    """``_decode`` of ``(position, document)`` pairs with sizes for pixels: the documents
    whose images would decode (their ``pixels`` set to ``ImageShape``s), and the others."""
    good, failed = [], []
    for _, document in documents:
        try:
            shapes = image_shapes(corpus, decoder, document.sample)
        except BadSample:
            failed.append(document)
        else:
            document.pixels.extend(shapes)
            good.append(document)
    return good, failed


def image_shapes(
    corpus: ShardCorpus, decoder: ImageDecoder, sample: LoadedSample
) -> List[ImageShape]:
    """The sizes of what the decoder gives for a sample's images (module docstring);
    raises ``BadSample``."""
    side = decoder.image_size
    if sample.plans is not None:  # tiling: every tile is S x S
        return [ImageShape(side, side)] * sample.num_tiles
    if decoder.native is None:
        return [ImageShape(side, side)] * len(sample.images)
    shapes = []
    for member in sample.images:
        width, height = image_size_of(corpus.reader.read(sample.shard, member))
        shapes.append(ImageShape(*decoder.native.image_size(height, width)))
    return shapes


def shard_documents_cost(documents: Sequence[ShardDocument], decoder: ImageDecoder) -> SequenceCost:
    """The ``SequenceCost`` of a sequence of these documents (images as sizes)."""
    native = decoder.native
    # Attention is per packed document: a preference pair is two (its images go with
    # the first part: only their total counts).
    parts = [
        (tokens, document.pixels if number == 0 else [])
        for document in documents
        for number, (tokens, _) in enumerate(document.parts())
    ]
    return documents_cost(parts, None if native is None else native.patch_size)
