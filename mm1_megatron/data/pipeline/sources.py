"""Sources of packed sequences from shards: captions and interleaved documents (the
conversation source builds on the caption one; text and the mixture are in
``text_and_mixture.py``).

Every source builds its ``k``-th sequence as a pure function of ``(seed, k)`` and the
data, so sequences can be built in any order, on any worker.

Sample order: ``ShardCorpus`` numbers the samples of a kind ``0, 1, 2, ...`` over all
epochs. Epoch ``e`` visits the shards in a permuted order and each shard's samples in a
permuted order (both drawn from ``(seed, stream, e[, shard])``), so consecutive samples
come from the same shard, as WebDataset reads them.

Packing (the shared rules are in ``packing.py``):

- caption: sequence ``k`` reads its *window*, samples ``k W .. k W + W - 1`` with ``W =
  data.caption_window``, and packs them first-fit in order, each whole and as its
  own document. A sample that does not fit next to the earlier ones is dropped
  (``unused_samples``); one too long for an empty sequence is skipped as ``too_long``.
- interleaved: sequence ``k`` is document ``k``, cut by ``packing.cut_interleaved``
  (never inside an image's tokens; an image past the cap ends the document).
- text: ``text_and_mixture.TextSource``.

A bad sample (``skips.BadSample``) is counted and replaced by a sample drawn at random
from the same epoch, at most ``MAX_REPLACEMENTS`` times per sequence; a sequence that
runs out keeps what it has (possibly nothing: all padding, no loss). Each process logs a
skipped sample once and remembers its verdict (``ShardCorpus.verdicts``): drawn again, it
fails at the same stage without being read (``load``: parsing, tokenizing, fitting) or
without its images being read and decoded (``decode``), so sequences stay the same pure
function of ``(seed, k)`` whichever worker builds them.

Cost (``sequence_cost(k)``, for balanced placement, ``balance.py``): the
``balance.SequenceCost`` of sequence ``k``, no image decoded. One ``_select`` picks the
documents for both (the same loads, fits, skips and replacements; cost mode counts into a
throwaway ``DataStats`` and neither logs nor remembers a skip), then ``sequence``
decodes their images and ``sequence_cost`` only sizes them (``source_costs.py``). A cost
is a pure function of ``(seed, k)`` and the data, the same in every process whatever it
built before (every rank must plan with the same numbers, and a resumed process as the
one that saved); so it agrees with the built sequence unless an accepted sample's images
fail to decode, which only decoding finds out.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mm1_megatron.batch.contract import expand_image_placeholders
from mm1_megatron.config.schema import TilingConfig
from mm1_megatron.data.pipeline.balance import SequenceCost
from mm1_megatron.data.pipeline.images import ImageDecoder, image_size_of
from mm1_megatron.data.pipeline.mixture import SOURCE_IDS
from mm1_megatron.data.pipeline.packing import (
    Image,
    PackedSequence,
    assemble,
    cut_interleaved,
)
from mm1_megatron.data.pipeline.shared_memory import stack_images
from mm1_megatron.data.pipeline.source_costs import measure_images, shard_documents_cost
from mm1_megatron.data.pipeline.tiling import (
    TilePlan,
    end_at_whole_image,
    plan_tiles,
    repeat_placeholders,
    separator_token,
)
from mm1_megatron.data.shards.reader import (
    Manifest,
    MemberRange,
    ShardReader,
    ShardSample,
    check_plain_tar,
)
from mm1_megatron.data.shards.records import tokenize_segments
from mm1_megatron.data.shards.skips import BadSample, DataStats, SkipVerdicts
from mm1_megatron.data.tokenizers.base import Tokenizer

MAX_REPLACEMENTS = 16
REPLACEMENT_STREAM = 11


@dataclass
class LoadedSample:
    shard: str
    key: str
    token_ids: List[int]  # one image placeholder per image
    images: List[MemberRange]
    plans: Optional[List[TilePlan]] = None  # with tiling: each image's tiles
    blobs: Optional[List[bytes]] = None  # with tiling: the images, read once for their size

    @property
    def num_tiles(self) -> int:
        """Inputs of the vision encoder: one per image, or per tile with tiling."""
        return len(self.images) if self.plans is None else sum(p.num_tiles for p in self.plans)

    def keep_tiles(self, num_tiles: int) -> None:
        """Keep the first images holding ``num_tiles`` tiles (later ones are never read)."""
        if self.plans is None:
            self.images = self.images[:num_tiles]
            return
        kept = total = 0
        while kept < len(self.plans) and total + self.plans[kept].num_tiles <= num_tiles:
            total += self.plans[kept].num_tiles
            kept += 1
        assert total == num_tiles, "a cut must never fall inside an image's tiles"
        self.images, self.plans = self.images[:kept], self.plans[:kept]
        self.blobs = self.blobs[:kept] if self.blobs is not None else None


@dataclass
class ShardDocument:
    tokens: List[int]  # expanded
    sample: LoadedSample
    pixels: List[Image] = field(default_factory=list)  # decoded, or sizes (cost mode)
    trainable: Optional[List[bool]] = None  # expanded, like tokens (None: all text)
    shortened: bool = False  # an overlong conversation cut at a turn boundary
    # A preference pair (chosen then rejected, images listed for each): where the
    # rejected conversation's tokens start; it is packed as two documents.
    split: Optional[int] = None

    def parts(self) -> List[Tuple[List[int], Optional[List[bool]]]]:
        """The documents this packs as: ``(tokens, trainable)`` each."""
        if self.split is None:
            return [(self.tokens, self.trainable)]
        cut, flags = self.split, self.trainable
        return [
            (self.tokens[:cut], flags and flags[:cut]),
            (self.tokens[cut:], flags and flags[cut:]),
        ]


class ShardCorpus:
    """All samples of one kind, in the epoch-shuffled order of the module docstring."""

    def __init__(self, manifests: Sequence[Manifest], *, seed: int, stream: int):
        self.shard_paths = [p for m in manifests for p in m.shard_paths]
        self.shard_sizes = np.array([n for m in manifests for n in m.shard_sizes], dtype=np.int64)
        self.num_samples = int(self.shard_sizes.sum())
        names = [m.path for m in manifests]
        if self.num_samples == 0:
            raise ValueError(f"shard manifests {names} list no samples")
        missing = [p for p in self.shard_paths if not os.path.isfile(p)]
        if missing:
            raise ValueError(
                f"{len(missing)} shards listed in {names} do not exist, e.g. {missing[:3]}"
            )
        check_plain_tar(self.shard_paths[0])
        self.seed, self.stream = seed, stream
        self.reader = ShardReader()
        self.formats = {p: m.records for m in manifests for p in m.shard_paths}
        self.excluded = frozenset().union(*(m.excluded for m in manifests))
        self.verdicts = SkipVerdicts()  # of the samples this process skipped
        self._epoch_cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._shard_orders: Dict[Tuple[int, int], np.ndarray] = {}

    def locate(self, position: int) -> Tuple[str, int]:
        """Shard path and sample number inside it of sample ``position``."""
        shard, number = self._locate(position)
        return self.shard_paths[shard], number

    def sample_id(self, position: int) -> int:
        """An int naming the sample at ``position`` (the same in every epoch)."""
        shard, number = self._locate(position)
        return shard << 32 | number

    def _locate(self, position: int) -> Tuple[int, int]:
        epoch, offset = divmod(position, self.num_samples)
        order, ends = self._epoch(epoch)
        slot = int(np.searchsorted(ends, offset, side="right"))
        shard = int(order[slot])
        inner = offset - int(ends[slot] - self.shard_sizes[shard])
        return shard, int(self._shard_order(epoch, shard)[inner])

    def open(self, position: int) -> Tuple[str, ShardSample]:
        """The shard and the member index of sample ``position``; raises ``BadSample``."""
        shard, number = self.locate(position)
        if (shard, number) in self.excluded:
            raise BadSample("excluded", f"sample {number} is excluded by the dataset's split")
        sample = self.reader.sample(shard, number)
        if sample.truncated:
            raise BadSample("truncated_tar", "a member's data is cut off by the end of the tar")
        return shard, sample

    def reader_of(self, shard: str, sample: ShardSample) -> Callable[[str], bytes]:
        return lambda extension: self.reader.read(shard, sample.members[extension])

    def conversation_record(self, shard: str, sample: ShardSample) -> Dict[str, object]:
        """The LLaVA-style record of a sample, in its shard's record format."""
        sizes = {extension: size for extension, (_, size) in sample.members.items()}
        return self.formats[shard].conversation(sizes, self.reader_of(shard, sample))

    def load(self, position: int, tokenizer: Tokenizer) -> LoadedSample:
        """Parse and tokenize a sample (images are not read yet); raises ``BadSample``."""
        shard, sample = self.open(position)
        members = sample.members
        segments = self.formats[shard].segments(
            {ext: size for ext, (_, size) in members.items()}, self.reader_of(shard, sample)
        )
        tokenized = tokenize_segments(segments, tokenizer)
        return LoadedSample(
            shard=shard,
            key=sample.key,
            token_ids=tokenized.token_ids,
            images=[members[ext] for ext in tokenized.image_members],
        )

    def describe(self, position: int) -> Tuple[str, str]:
        """(shard, key) of a sample for messages; never raises."""
        shard, number = self.locate(position)
        try:
            return shard, self.reader.sample(shard, number).key
        except BadSample:
            return shard, f"#{number}"

    def replacement(self, rng: np.random.Generator, near_position: int) -> int:
        """A random sample of the same epoch as ``near_position``."""
        epoch = near_position // self.num_samples
        return epoch * self.num_samples + int(rng.integers(self.num_samples))

    def _epoch(self, epoch: int) -> Tuple[np.ndarray, np.ndarray]:
        if epoch not in self._epoch_cache:
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            order = rng.permutation(len(self.shard_paths))
            self._epoch_cache = {epoch: (order, np.cumsum(self.shard_sizes[order]))}
        return self._epoch_cache[epoch]

    def _shard_order(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._shard_orders:
            if len(self._shard_orders) > 256:
                self._shard_orders.clear()
            rng = np.random.default_rng([self.seed, self.stream, epoch, shard])
            self._shard_orders[key] = rng.permutation(int(self.shard_sizes[shard]))
        return self._shard_orders[key]


class _ShardSource:
    def __init__(
        self,
        name: str,
        corpus: ShardCorpus,
        *,
        tokenizer: Tokenizer,
        decoder: ImageDecoder,
        seq_length: int,
        num_image_tokens: int,
        max_images: int,
        seed: int,
        tiling: Optional[TilingConfig] = None,
    ):
        self.name, self.corpus, self.tokenizer, self.decoder = name, corpus, tokenizer, decoder
        self.seq_length, self.num_image_tokens = seq_length, num_image_tokens
        self.max_images, self.seed = max_images, seed
        self.tiling = tiling if tiling is not None and tiling.mode != "none" else None
        self.separator_id = separator_token(tiling, tokenizer) if self.tiling else None

    def sequence(self, index: int) -> Tuple[PackedSequence, DataStats]:
        """Sequence ``index`` and the counts of what building it skipped or dropped."""
        stats = DataStats()
        return self._assemble(self._select(index, stats, decode=True)), stats

    def sequence_cost(self, index: int) -> SequenceCost:
        """``balance.cost_of_sequence(self.sequence(index)[0])`` without decoding an image
        (module docstring)."""
        return shard_documents_cost(self._select(index, DataStats(), decode=False), self.decoder)

    def _select(self, index: int, stats: DataStats, decode: bool) -> List[ShardDocument]:
        """The documents of sequence ``index``, with their images decoded (``decode``) or
        only sized (``_images``)."""
        raise NotImplementedError

    def _images(
        self, documents: List[Tuple[int, ShardDocument]], stats: DataStats, decode: bool
    ) -> Tuple[List[ShardDocument], List[ShardDocument]]:
        """``_decode``, or in cost mode (not ``decode``) ``source_costs.measure_images``:
        each image's size, nothing decoded, no decode verdict counted or remembered."""
        if decode:
            return self._decode(documents, stats)
        return measure_images(self.corpus, self.decoder, documents)

    def _tile(
        self, sample: LoadedSample, ids: List[int], flags: Optional[List[bool]] = None
    ) -> Tuple[List[int], Optional[List[bool]]]:
        """With tiling: read the sample's images for their sizes, plan their tiles and
        repeat each image's placeholder once per tile. Raises ``BadSample``."""
        if self.tiling is None or not sample.images:
            return ids, flags
        blobs = [self.corpus.reader.read(sample.shard, member) for member in sample.images]
        sizes = [image_size_of(blob) for blob in blobs]
        smallest = min(min(size) for size in sizes)
        if smallest < self.tiling.min_image_side:
            raise BadSample(
                "too_small",
                f"an image side of {smallest} px is under "
                f"data.tiling.min_image_side={self.tiling.min_image_side}",
            )
        sample.plans, sample.blobs = plan_tiles(sizes, self.tiling), blobs
        counts = [plan.num_tiles for plan in sample.plans]
        return repeat_placeholders(
            ids,
            flags,
            counts,
            image_token_id=self.tokenizer.image_token_id,
            separator_id=self.separator_id,
        )

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, REPLACEMENT_STREAM, SOURCE_IDS[self.name], index])

    def _load_once(self, position: int) -> ShardDocument:
        """``_load``; a sample this process skipped while loading fails again at once."""
        known = self.corpus.verdicts.recall(self.corpus.sample_id(position), "load")
        if known is not None:
            raise known
        return self._load(position)

    def _skip(self, stats: DataStats, error: BadSample, position: int, stage: str) -> None:
        """Count the skip; log it (and remember it) the first time only."""
        first = self.corpus.verdicts.remember(self.corpus.sample_id(position), error, stage)
        shard, key = self.corpus.describe(position)
        stats.skip(error, shard=shard, key=key, log=first)

    def _decode(
        self,
        documents: List[Tuple[int, ShardDocument]],
        stats: DataStats,
    ) -> Tuple[List[ShardDocument], List[ShardDocument]]:
        """Read and decode the images of ``(position, document)`` pairs in one batch.

        Returns the documents whose images all decoded, and those that failed (counted).
        """
        blobs, plans, owners, failed = [], [], [], {}
        for number, (position, document) in enumerate(documents):
            sample = document.sample
            known = self.corpus.verdicts.recall(self.corpus.sample_id(position), "decode")
            if known is not None:  # failed before: its images are not read again
                failed[number] = known
                continue
            try:
                if sample.blobs is not None:
                    blobs += sample.blobs
                    plans += sample.plans
                else:
                    blobs += [self.corpus.reader.read(sample.shard, m) for m in sample.images]
                owners += [number] * len(sample.images)
            except BadSample as error:
                failed[number] = error
        decoded_images = self.decoder.decode_tiles(blobs, plans) if plans else None
        if decoded_images is None:
            decoded_images = [
                d if isinstance(d, BadSample) else [d] for d in self.decoder.decode(blobs)
            ]
        for owner, decoded in zip(owners, decoded_images):
            if owner in failed:
                continue
            if isinstance(decoded, BadSample):
                failed[owner] = decoded
            else:
                documents[owner][1].pixels.extend(decoded)
        for number, error in failed.items():
            self._skip(stats, error, documents[number][0], "decode")
        good = [doc for number, (_, doc) in enumerate(documents) if number not in failed]
        return good, [documents[number][1] for number in failed]

    def _assemble(self, documents: List[ShardDocument]) -> PackedSequence:
        pixels = [p for doc in documents for p in doc.pixels]
        native, grids = self.decoder.native, None
        if native is not None:  # each image at its own size: packed as patches
            images, grids = native.pack(pixels) if pixels else native.empty(self.decoder.dtype)
        else:
            images = stack_images(pixels) if pixels else self.decoder.empty()
        parts = [part for doc in documents for part in doc.parts()]
        return assemble(
            [tokens for tokens, _ in parts],
            source=self.name,
            seq_length=self.seq_length,
            tokenizer=self.tokenizer,
            images=images,
            image_grids=grids,
            trainable=[trainable for _, trainable in parts],
        )

    def _check_fits(self, num_tokens: int, num_tiles: int, what: str = "") -> None:
        """``BadSample("too_long")`` unless a document this size fits an empty sequence."""
        if num_tokens > self.seq_length or num_tiles > self.max_images:
            raise BadSample(
                "too_long",
                f"{what}{num_tokens} tokens and {num_tiles} images (tiles) exceed "
                f"seq_length={self.seq_length} / max_images={self.max_images}",
            )

    def _expand(self, token_ids: List[int]) -> List[int]:
        return expand_image_placeholders(
            token_ids,
            image_token_id=self.tokenizer.image_token_id,
            num_image_tokens=self.num_image_tokens,
        )


class CaptionSource(_ShardSource):
    """Caption pairs packed several to a sequence, ``window`` read per sequence (module
    docstring)."""

    def __init__(self, name: str, corpus: ShardCorpus, *, window: int, **options):
        if window < 1:
            raise ValueError(f"data.caption_window={window} must be >= 1")
        super().__init__(name, corpus, **options)
        self.window = window

    def _select(self, index: int, stats: DataStats, decode: bool) -> List[ShardDocument]:
        rng, window = self._rng(index), self.window
        queue = deque(range(index * window, (index + 1) * window))
        num_replacements, kept = 0, []
        num_tokens = num_images = 0
        while queue:
            accepted: List[Tuple[int, ShardDocument]] = []
            while queue:
                position = queue.popleft()
                try:
                    document = self._load_once(position)
                except BadSample as error:
                    if decode:  # planning neither logs nor remembers a skip
                        self._skip(stats, error, position, "load")
                    if num_replacements < MAX_REPLACEMENTS:
                        num_replacements += 1
                        queue.append(self.corpus.replacement(rng, index * window))
                    continue
                if document.shortened:
                    stats.add("shortened_conversations")
                cost, count = len(document.tokens), document.sample.num_tiles
                if num_tokens + cost <= self.seq_length and num_images + count <= self.max_images:
                    accepted.append((position, document))
                    num_tokens, num_images = num_tokens + cost, num_images + count
                else:
                    stats.add("unused_samples")
            good, failed = self._images(accepted, stats, decode)
            kept += good
            for document in failed:
                num_tokens -= len(document.tokens)
                num_images -= document.sample.num_tiles
                if num_replacements < MAX_REPLACEMENTS:
                    num_replacements += 1
                    queue.append(self.corpus.replacement(rng, index * window))
        return kept

    def _load(self, position: int) -> ShardDocument:
        sample = self.corpus.load(position, self.tokenizer)
        tokens = self._expand(self._tile(sample, sample.token_ids)[0])
        self._check_fits(len(tokens), sample.num_tiles)
        return ShardDocument(tokens=tokens, sample=sample)


class InterleavedSource(_ShardSource):
    """One interleaved document per sequence, cut to fit (module docstring)."""

    def _select(self, index: int, stats: DataStats, decode: bool) -> List[ShardDocument]:
        rng, position = self._rng(index), index
        for _ in range(MAX_REPLACEMENTS + 1):
            try:
                document = self._load_once(position)
            except BadSample as error:
                if decode:  # planning neither logs nor remembers a skip
                    self._skip(stats, error, position, "load")
            else:
                good, _ = self._images([(position, document)], stats, decode)
                if good:
                    return good
            position = self.corpus.replacement(rng, index)
        return []

    def _load(self, position: int) -> ShardDocument:
        sample = self.corpus.load(position, self.tokenizer)
        tiled = self._tile(sample, sample.token_ids)[0]
        kept, num_tiles = cut_interleaved(
            tiled,
            seq_length=self.seq_length,
            num_image_tokens=self.num_image_tokens,
            max_images=self.max_images,
            image_token_id=self.tokenizer.image_token_id,
        )
        if sample.plans is not None:  # never part of an image's tiles and separators
            counts = [plan.num_tiles for plan in sample.plans]
            kept, num_tiles = end_at_whole_image(kept, tiled, counts, self.tokenizer.image_token_id)
        sample.keep_tiles(num_tiles)  # later images are never decoded
        return ShardDocument(tokens=self._expand(kept), sample=sample)
