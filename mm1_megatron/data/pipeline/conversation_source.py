"""Conversation shards as a source of packed sequences (``data.shards.conversation``).

A conversation sample is a ``json`` member holding a LLaVA-style record, whose ``image``
names the sample's image members in marker order, plus those images
(``mm1 data shards conversations`` writes them from LLaVA JSON and an image folder).

Sequence ``k`` reads a window of samples like the caption source (``data.caption_window``
of them, or one with ``data.conversations.packing=one_per_sequence``) and packs those that
fit, each conversation its own document, the loss on its assistant turns only. A
conversation too long for an empty sequence is cut after its last whole answer that fits
(``overlong: truncate``, counted as ``shortened_conversations``) or skipped as
``too_long``; a malformed record is skipped as ``bad_record`` with the reason.
``sequence_cost`` (balanced placement) is the caption source's: the same selection, the
images sized instead of decoded (``sources.py``).

Preference shards (``data.shards.preference``, for DPO) hold one pair per sample: a
prompt and two answers (``shards/preference_records.py``). ``PreferenceSource`` loads a
pair as one unit, the chosen conversation then the rejected one, each with the sample's
images (so a pair counts its images twice against ``max_images_per_sequence``, as the
encoder sees them twice), the loss on each last answer only; it packs as two documents,
so document ``2k`` is pair ``k``'s chosen answer and ``2k + 1`` its rejected one, as the
DPO loss reads them (``training/preference.py``). A pair is never cut: one too long for
an empty sequence is skipped as ``too_long``.
"""

from __future__ import annotations

from mm1_megatron.batch.contract import expand_trainable
from mm1_megatron.data.pipeline.sources import (
    CaptionSource,
    LoadedSample,
    ShardCorpus,
    ShardDocument,
)
from mm1_megatron.data.shards.conversations import (
    ChatTemplate,
    Conversation,
    parse_llava_record,
    template_token,
    tokenize_conversation,
    truncate_conversation,
)
from mm1_megatron.data.shards.preference_records import parse_preference_record, tokenize_answer
from mm1_megatron.data.shards.skips import BadSample, parse_untrusted


class ConversationSource(CaptionSource):
    def __init__(
        self,
        name: str,
        corpus: ShardCorpus,
        *,
        window: int,
        template: ChatTemplate,
        overlong: str,
        one_per_sequence: bool,
        **options,
    ):
        super().__init__(name, corpus, window=1 if one_per_sequence else window, **options)
        self.template, self.overlong = template, overlong
        self.end_of_turn_id = template_token(self.tokenizer, template.end_of_turn)

    def _load(self, position: int) -> ShardDocument:
        shard, sample = self.corpus.open(position)
        record = self.corpus.conversation_record(shard, sample)
        conversation = parse_untrusted("conversation record", parse_llava_record, record)
        ids, targets = self._tokenize(tokenize_conversation, conversation)
        loaded = LoadedSample(
            shard=shard,
            key=sample.key,
            token_ids=ids,
            images=[sample.members[name] for name in conversation.images],
        )
        tokens, flags = self._tiled_and_expanded(loaded, ids, targets)
        if len(tokens) <= self.seq_length and loaded.num_tiles <= self.max_images:
            return ShardDocument(tokens=tokens, sample=loaded, trainable=flags)
        return self._shortened(tokens, flags, loaded)

    def _tokenize(self, tokenize, conversation: Conversation):
        try:
            return tokenize(conversation, self.template, self.tokenizer)
        except ValueError as exc:  # a role marker this tokenizer splits into several tokens
            raise BadSample("bad_text", str(exc)) from exc

    def _tiled_and_expanded(self, loaded: LoadedSample, ids, targets):
        """Expanded tokens and their trainable flags (with tiling, the images' tiles)."""
        ids, targets = self._tile(loaded, ids, targets)
        flags = expand_trainable(
            ids,
            targets,
            image_token_id=self.tokenizer.image_token_id,
            num_image_tokens=self.num_image_tokens,
        )
        return self._expand(ids), flags

    def _shortened(self, tokens, flags, loaded: LoadedSample) -> ShardDocument:
        fitted = None
        if self.overlong == "truncate":
            fitted = truncate_conversation(
                tokens,
                flags,
                max_length=self.seq_length,
                max_images=self.max_images,
                image_token_id=self.tokenizer.image_token_id,
                num_image_tokens=self.num_image_tokens,
                end_of_turn_id=self.end_of_turn_id,
                eos_id=self.tokenizer.eos_token_id,
            )
        if fitted is None:
            raise BadSample(
                "too_long",
                f"{len(tokens)} tokens and {loaded.num_tiles} images (tiles) exceed "
                f"seq_length={self.seq_length} / max_images={self.max_images}"
                + ("" if self.overlong == "drop" else " even after the first answer"),
            )
        kept_tiles = fitted[0].count(self.tokenizer.image_token_id) // self.num_image_tokens
        loaded.keep_tiles(kept_tiles)  # later images are never decoded
        return ShardDocument(tokens=fitted[0], sample=loaded, trainable=fitted[1], shortened=True)


class PreferenceSource(ConversationSource):
    """Preference pairs from shards, each packed whole as two documents (module docstring)."""

    def _load(self, position: int) -> ShardDocument:
        shard, sample = self.corpus.open(position)
        record = self.corpus.conversation_record(shard, sample)
        pair = parse_untrusted("preference record", parse_preference_record, record)
        images = [sample.members[name] for name in pair[0].images]
        loaded = LoadedSample(shard=shard, key=sample.key, token_ids=[], images=images)
        sides = []
        for conversation in pair:
            ids, targets = self._tokenize(tokenize_answer, conversation)
            loaded.token_ids += ids
            sides.append(self._tiled_and_expanded(loaded, ids, targets))
        loaded.images = images + images  # both answers see the images
        if loaded.plans is not None:
            loaded.plans, loaded.blobs = loaded.plans * 2, loaded.blobs * 2
        tokens = sides[0][0] + sides[1][0]
        self._check_fits(len(tokens), loaded.num_tiles, "a pair (its images counted twice): ")
        return ShardDocument(
            tokens=tokens,
            sample=loaded,
            trainable=sides[0][1] + sides[1][1],
            split=len(sides[0][0]),
        )
