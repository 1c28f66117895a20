"""Conversations: LLaVA records, the chat template, and which tokens are trained on."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mm1_megatron.data.pipeline.packing import Sample, pack_sequence
from mm1_megatron.data.shards.conversations import (
    ChatTemplate,
    Conversation,
    Turn,
    parse_llava_record,
    target_tokens,
    tokenize_conversation,
    truncate_conversation,
)
from mm1_megatron.data.shards.skips import BadSample, DataStats
from mm1_megatron.data.synthetic.conversations import synthetic_conversation
from mm1_megatron.data.synthetic.world import draw_scene
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

TOK = SyntheticTokenizer()
TEMPLATE = ChatTemplate()

RECORD = {
    "id": "0",
    "image": "shapes.png",
    "conversations": [
        {"from": "human", "value": "<image>\nhow many shapes ?"},
        {"from": "gpt", "value": "there are two shapes ."},
        {"from": "human", "value": "what is at the top left ?"},
        {"from": "gpt", "value": "red"},
    ],
}


def _words(ids):
    return TOK.decode(ids).split()


def test_llava_record_tokenizes_with_markers_and_assistant_targets():
    conversation = parse_llava_record(RECORD)
    assert conversation.images == ("shapes.png",)
    assert [turn.role for turn in conversation.turns] == ["user", "assistant"] * 2
    ids, targets = tokenize_conversation(conversation, TEMPLATE, TOK)
    assert len(ids) == len(targets)
    assert " ".join(_words(ids)) == (
        "<bos> <user> <image> how many shapes ? <end_turn> "
        "<assistant> there are two shapes . <end_turn> "
        "<user> what is at the top left ? <end_turn> "
        "<assistant> red <end_turn> <eos>"
    )
    # Exactly the assistant answers and the end-of-turn closing each of them.
    assert " ".join(_words(target_tokens(ids, targets))) == (
        "there are two shapes . <end_turn> red <end_turn>"
    )


def test_system_turns_and_images_in_assistant_turns_are_never_targets():
    conversation = Conversation(
        (
            Turn("system", "describe the picture"),
            Turn("user", "what is here ?"),
            Turn("assistant", "<image> it shows a red circle ."),
        ),
        ("a.png",),
    )
    ids, targets = tokenize_conversation(conversation, TEMPLATE, TOK)
    assert _words(target_tokens(ids, targets)) == [
        *"it shows a red circle .".split(),
        "<end_turn>",
    ]
    assert not any(t for i, t in zip(ids, targets) if i == TOK.image_token_id)


def test_text_only_conversation_has_no_images():
    record = {"conversations": RECORD["conversations"][2:]}
    conversation = parse_llava_record(record)
    assert conversation.images == ()
    ids, _ = tokenize_conversation(conversation, TEMPLATE, TOK)
    assert TOK.image_token_id not in ids


@pytest.mark.parametrize(
    "change, message",
    [
        ({"conversations": [{"from": "human", "value": "<image> what ?"}]}, "no assistant"),
        ({"image": ["a.png", "b.png"]}, "1 <image> markers for 2 images"),
        ({"image": []}, "1 <image> markers for 0 images"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown role 'robot'"),
        ({"conversations": [{"from": "gpt", "value": 3}]}, "no text"),
        ({"conversations": []}, "no 'conversations'"),
        ({"image": 7}, "file name"),
    ],
)
def test_bad_records_are_skipped_with_the_reason(change, message):
    with pytest.raises(BadSample, match=message) as error:
        parse_llava_record({**RECORD, **change})
    assert error.value.reason == "bad_record"


def test_a_marker_that_is_several_tokens_is_refused():
    with pytest.raises(ValueError, match="single token"):
        tokenize_conversation(parse_llava_record(RECORD), ChatTemplate(user="what is"), TOK)


def _conversation_samples(seed: int):
    rng = np.random.default_rng(seed)
    while True:
        conversation, scene = synthetic_conversation(rng)
        ids, targets = tokenize_conversation(conversation, TEMPLATE, TOK)
        yield Sample("conversation", ids, [draw_scene(scene, 28)], trainable=targets)


def _recording(stream, drawn):
    for sample in stream:
        drawn.append(sample)
        yield sample


def test_in_a_packed_batch_exactly_the_assistant_tokens_carry_labels():
    num_image_tokens = 4
    for seed in range(5):
        drawn = []
        seq = pack_sequence(
            _recording(_conversation_samples(seed), drawn),
            seq_length=256,
            num_image_tokens=num_image_tokens,
            max_images=8,
            tokenizer=TOK,
            image_size=28,
            image_mean=[0.5] * 3,
            image_std=[0.25] * 3,
        )
        packed = drawn[: int(seq.document_ids[: seq.num_real_tokens].max()) + 1]
        assert len(packed) >= 2, "several conversations share the sequence"
        # Every position whose next token is an assistant token or the end-of-turn
        # closing an assistant turn has that token as its label, and no other position
        # has a label: in order, the labelled tokens are the conversations' targets.
        expected = [t for s in packed for t in target_tokens(s.token_ids, s.trainable)]
        labelled = seq.labels[seq.loss_mask.bool()].tolist()
        assert labelled == expected
        words = TOK.decode(labelled).split()
        assert "<user>" not in words and "<assistant>" not in words and "?" not in words
        assert words.count("<end_turn>") == sum(
            1
            for s in packed
            for i, t in zip(s.token_ids, s.trainable)
            if t and i == TOK.encode("<end_turn>")[0]
        )
        # Labels never reach across two conversations.
        mask = seq.loss_mask.bool()
        same = seq.document_ids[1:] == seq.document_ids[:-1]
        assert bool((same | ~mask[:-1]).all())


def _expanded(conversation, num_image_tokens=4):
    ids, targets = tokenize_conversation(conversation, TEMPLATE, TOK)
    tokens, flags = [], []
    for token, flag in zip(ids, targets):
        count = num_image_tokens if token == TOK.image_token_id else 1
        tokens += [token] * count
        flags += [flag and token != TOK.image_token_id] * count
    return tokens, flags


def _truncate(tokens, flags, max_length, max_images=8):
    return truncate_conversation(
        tokens,
        flags,
        max_length=max_length,
        max_images=max_images,
        image_token_id=TOK.image_token_id,
        num_image_tokens=4,
        end_of_turn_id=TOK.encode("<end_turn>")[0],
        eos_id=TOK.eos_token_id,
    )


def test_an_overlong_conversation_is_cut_after_its_last_whole_answer_that_fits():
    conversation = parse_llava_record(RECORD)
    tokens, flags = _expanded(conversation)
    first_answer_end = tokens.index(
        TOK.encode("<end_turn>")[0], tokens.index(TOK.encode("<assistant>")[0])
    )
    for max_length in range(first_answer_end + 2, len(tokens)):
        cut_tokens, cut_flags = _truncate(tokens, flags, max_length)
        assert len(cut_tokens) <= max_length and cut_tokens[-1] == TOK.eos_token_id
        assert _words(cut_tokens[-2:]) == ["<end_turn>", "<eos>"]
        assert cut_flags[-2] is True  # the kept answer's end-of-turn is still trained on
        assert cut_tokens[:-1] == tokens[: len(cut_tokens) - 1]
    # Not even the first answer fits (or the image would be cut): no conversation.
    assert _truncate(tokens, flags, first_answer_end + 1) is None
    assert _truncate(tokens, flags, 3) is None
    assert _truncate(tokens, flags, len(tokens), max_images=0) is None


def test_packing_shortens_or_drops_an_overlong_conversation_and_counts_it():
    conversation = parse_llava_record(RECORD)
    ids, targets = tokenize_conversation(conversation, TEMPLATE, TOK)
    long = Sample("conversation", ids, [torch.rand(3, 28, 28)], trainable=targets)
    short = Sample("conversation", ids[:4], [], trainable=[False, False, True, True])
    seq_length = len(_expanded(conversation)[0]) - 3
    policies = {
        "truncate": lambda tokens, flags: _truncate(tokens, flags, seq_length),
        "drop": lambda tokens, flags: None,
    }
    for policy, fit in policies.items():
        stats = DataStats()
        seq = pack_sequence(
            itertools.chain([long], itertools.repeat(short)),
            seq_length=seq_length,
            num_image_tokens=4,
            max_images=8,
            tokenizer=TOK,
            image_size=28,
            image_mean=[0.5] * 3,
            image_std=[0.25] * 3,
            fit_overlong=fit,
            stats=stats,
        )
        if policy == "truncate":  # the long one, cut after its first answer, alone
            assert stats.counts["shortened_conversations"] == 1
            assert seq.num_images == 1 and int(seq.document_ids[0]) == 0
            assert TOK.decode(seq.tokens[: seq.num_real_tokens]).endswith("<end_turn> <eos>")
        else:  # skipped; the short ones fill the sequence
            assert stats.counts["too_long"] == 1 and seq.num_images == 0
            assert seq.num_real_tokens == (seq_length // 4) * 4
