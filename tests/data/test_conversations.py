"""Conversations: LLaVA records, the chat template, and which tokens are trained on."""

from __future__ import annotations

import pytest

from mm1_megatron.data.pipeline.conversations import (
    ChatTemplate,
    Conversation,
    Turn,
    parse_llava_record,
    target_tokens,
    tokenize_conversation,
)
from mm1_megatron.data.shards.skips import BadSample
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
