"""The embedded synthetic world as a sequence builder, like the shard and text sources.

Sequence ``g`` (its *global index*) is a pure function of ``(seed, g)``: a fresh
``numpy.random.default_rng([seed, g])`` first draws the sequence's source from the
mixture, then every sample packed into it. Data-parallel sharding, prefetch workers and
the saved position belong to ``pipeline.loader.MicroBatchLoader``, which serves this
builder exactly as it serves shards.

At native resolution (``native``) each image is drawn at one of ``world.ASPECT_RATIOS``:
SigLIP 2's size rule applied to an image of that ratio whose longer side is
``image_size`` (``native_image_sizes``), so the scenes come as the rule would resize them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mm1_megatron.config.schema import ConversationConfig, TilingConfig
from mm1_megatron.data.pipeline.balance import SequenceCost
from mm1_megatron.data.pipeline.mixture import mixture_probabilities
from mm1_megatron.data.pipeline.native_resolution import NativeResolution
from mm1_megatron.data.pipeline.packing import (
    PackedSequence,
    Sample,
    check_packing_arguments,
    documents_cost,
    pack_documents,
    pack_sequence,
)
from mm1_megatron.data.pipeline.preferences import SOURCE as PREFERENCE
from mm1_megatron.data.pipeline.preferences import (
    Pair,
    pack_preference_pairs,
    preference_documents,
)
from mm1_megatron.data.pipeline.tiling import separator_token, tile_sample
from mm1_megatron.data.shards.conversations import (
    ChatTemplate,
    Conversation,
    Turn,
    template_token,
    tokenize_conversation,
    truncate_conversation,
)
from mm1_megatron.data.shards.skips import DataStats
from mm1_megatron.data.synthetic.conversations import synthetic_conversation
from mm1_megatron.data.synthetic.preferences import synthetic_preference
from mm1_megatron.data.synthetic.video import SOURCE as VIDEO
from mm1_megatron.data.synthetic.video import video_samples
from mm1_megatron.data.synthetic.world import ASPECT_RATIOS, SyntheticGenerator
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer, Tokenizer

logger = logging.getLogger(__name__)


class SyntheticSequences:
    """``sequence(g) -> (PackedSequence, DataStats)`` drawn from the synthetic world."""

    def __init__(
        self,
        mixture: dict,
        *,
        seq_length: int,
        num_image_tokens: int,
        max_images: int,
        image_size: int,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        seed: int,
        tokenizer: Optional[Tokenizer] = None,
        tiling: Optional[TilingConfig] = None,
        conversations: Optional[ConversationConfig] = None,
        native: Optional[NativeResolution] = None,
        video_frames: int = 4,
    ):
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
        check_packing_arguments(seq_length, num_image_tokens, max_images, image_mean, image_std)
        self.probabilities = mixture_probabilities(mixture)
        self.tokenizer = tokenizer if tokenizer is not None else SyntheticTokenizer()
        self.tiling = tiling if tiling is not None else TilingConfig()
        self.conversations = conversations if conversations is not None else ConversationConfig()
        self.template = ChatTemplate(**dataclasses.asdict(self.conversations.chat_template))
        self.end_of_turn_id = (
            template_token(self.tokenizer, self.template.end_of_turn)
            if self.probabilities["conversation"] > 0 or self.probabilities[PREFERENCE] > 0
            else None
        )
        # With tiling, scenes are drawn at twice the tile size and tiled like any image;
        # ``image_size`` is then the tile size the encoder sees.
        self.draw_size = image_size if self.tiling.mode == "none" else 2 * image_size
        self.separator_id = separator_token(self.tiling, self.tokenizer)
        if native is not None and self.tiling.mode != "none":
            raise ValueError(
                "model.vision.native_resolution=true replaces tiles: set data.tiling.mode=none"
            )
        sizes = None if native is None else native_image_sizes(image_size, native)
        self.generator = SyntheticGenerator(self.tokenizer, self.draw_size, image_sizes=sizes)
        # The same draws without pixels: what ``sequence_cost`` packs.
        self.shapes_only = SyntheticGenerator(
            self.tokenizer, self.draw_size, image_sizes=sizes, render=False
        )
        self.packing = dict(
            seq_length=seq_length,
            num_image_tokens=num_image_tokens,
            max_images=max_images,
            image_size=image_size,
            image_mean=list(image_mean),
            image_std=list(image_std),
            native=native,
        )
        self.seed = seed
        self.video_frames = video_frames
        logger.info(
            "synthetic data: mixture %s, seed %d",
            {k: round(v, 4) for k, v in self.probabilities.items()},
            seed,
        )

    def source_of(self, global_index: int) -> str:
        """The source of sequence ``global_index`` (cheap: draws no content)."""
        return self._draw_source(self._rng(global_index))

    def sequence(self, global_index: int) -> Tuple[PackedSequence, DataStats]:
        """Sequence ``global_index``; its stats count only conversations shortened or
        skipped for length (the synthetic world has no bad samples)."""
        rng = self._rng(global_index)
        source = self._draw_source(rng)
        stats = DataStats()
        if source == PREFERENCE:
            packed = pack_preference_pairs(
                self._pairs(rng, self.generator),
                tokenizer=self.tokenizer,
                stats=stats,
                **self.packing,
            )
            return packed, stats
        packed = pack_sequence(
            self._samples(source, rng, self.generator),
            tokenizer=self.tokenizer,
            stats=stats,
            **self._source_options(source),
            **self.packing,
        )
        return packed, stats

    def sequence_cost(self, global_index: int) -> SequenceCost:
        """``balance.cost_of_sequence(self.sequence(global_index)[0])``, without drawing
        a pixel: the same random draws, the images only as sizes."""
        rng = self._rng(global_index)
        source = self._draw_source(rng)
        native = self.packing["native"]
        patch_size = None if native is None else native.patch_size
        if source == PREFERENCE:
            documents = preference_documents(
                self._pairs(rng, self.shapes_only),
                seq_length=self.packing["seq_length"],
                num_image_tokens=self.packing["num_image_tokens"],
                max_images=self.packing["max_images"],
                image_token_id=self.tokenizer.image_token_id,
            )
            return documents_cost(documents, patch_size)
        _, documents = pack_documents(
            self._samples(source, rng, self.shapes_only),
            seq_length=self.packing["seq_length"],
            num_image_tokens=self.packing["num_image_tokens"],
            max_images=self.packing["max_images"],
            image_token_id=self.tokenizer.image_token_id,
            **self._source_options(source),
        )
        return documents_cost(documents, patch_size)

    def _source_options(self, source: str) -> dict:
        conversation = source == "conversation"
        return dict(
            one_per_sequence=conversation and self.conversations.packing == "one_per_sequence",
            fit_overlong=self._fit_overlong if conversation else None,
        )

    def _samples(
        self, source: str, rng: np.random.Generator, generator: SyntheticGenerator
    ) -> Iterator[Sample]:
        if source == "conversation":
            samples = self._conversations(rng, generator)
        elif source == VIDEO:
            samples = video_samples(generator, rng, self.video_frames)
        else:
            samples = generator.stream(source, rng)
        return self._tiled(samples)

    def _conversations(
        self, rng: np.random.Generator, generator: SyntheticGenerator
    ) -> Iterator[Sample]:
        while True:
            conversation, scene = synthetic_conversation(rng)
            ids, targets = tokenize_conversation(conversation, self.template, self.tokenizer)
            image = generator.draw(scene, rng)
            yield Sample("conversation", ids, [image], trainable=targets)

    def _pairs(self, rng: np.random.Generator, generator: SyntheticGenerator) -> Iterator[Pair]:
        """Preference pairs: (chosen, rejected) conversations of one scene and question."""
        while True:
            pair = synthetic_preference(rng)
            image = generator.draw(pair.scene, rng)
            samples = []
            for answer in (pair.chosen, pair.rejected):
                if pair.prompt is None:  # a caption: every text token is the answer
                    sample = generator.captioned(answer.split(), image, PREFERENCE)
                    sample.trainable = [True] * len(sample.token_ids)
                else:
                    turns = (Turn("user", pair.prompt), Turn("assistant", answer))
                    conversation = Conversation(turns, ("scene",))
                    ids, targets = tokenize_conversation(
                        conversation, self.template, self.tokenizer
                    )
                    sample = Sample(PREFERENCE, ids, [image], trainable=targets)
                samples.append(sample)
            yield tuple(self._tiled(samples))

    def _tiled(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        if self.tiling.mode == "none":
            return iter(samples)
        return (
            tile_sample(
                sample,
                self.tiling,
                image_token_id=self.tokenizer.image_token_id,
                fill=self.packing["image_mean"],
                separator_id=self.separator_id,
            )
            for sample in samples
        )

    def _fit_overlong(self, tokens: List[int], trainable: List[bool]):
        if self.conversations.overlong == "drop":
            return None
        return truncate_conversation(
            tokens,
            trainable,
            max_length=self.packing["seq_length"],
            max_images=self.packing["max_images"],
            image_token_id=self.tokenizer.image_token_id,
            num_image_tokens=self.packing["num_image_tokens"],
            end_of_turn_id=self.end_of_turn_id,
            eos_id=self.tokenizer.eos_token_id,
        )

    def _rng(self, global_index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, global_index])

    def _draw_source(self, rng: np.random.Generator) -> str:
        """First draw of a sequence's RNG: inverse CDF over ``SOURCE_IDS`` order."""
        u = rng.random()
        cumulative = 0.0
        last_possible = [name for name, p in self.probabilities.items() if p > 0][-1]
        for name, probability in self.probabilities.items():
            cumulative += probability
            if probability > 0 and u < cumulative:
                return name
        return last_possible  # u within rounding of 1.0


def native_image_sizes(image_size: int, native: NativeResolution) -> List[Tuple[int, int]]:
    """``(height, width)`` in pixels of the synthetic images at native resolution: one per
    ``ASPECT_RATIOS`` (width:height), as the size rule resizes an image of that ratio whose
    longer side is ``image_size``."""
    sizes = []
    for ratio_width, ratio_height in ASPECT_RATIOS:
        longer = max(ratio_width, ratio_height)
        height = max(1, round(image_size * ratio_height / longer))
        width = max(1, round(image_size * ratio_width / longer))
        sizes.append(native.image_size(height, width))
    return sizes
