"""Preference records: a prompt conversation and two answers to it, for DPO.

The JSON is LLaVA's conversation record with two more keys (other layouts, e.g. RLAIF-V's
parquet with ``question`` / ``chosen`` / ``rejected``, convert to it first)::

    {"image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"}],
     "chosen": "A red cup.",
     "rejected": "A blue bowl."}

``conversations`` is the prompt: any turns (earlier answers included, as context) that
end with a user turn, holding one ``<image>`` marker per image. ``chosen`` and
``rejected`` are the two answers' text (a string, or one assistant turn written as LLaVA
does, ``{"from": "gpt", "value": ...}``); they must differ and may hold no image marker.

A pair becomes two conversations, the prompt plus each answer, tokenized with the chat
template (``conversations.py``), and trained on the *last* answer only: earlier assistant
turns of the prompt are context here, as the reference model also sees them. Malformed
records raise ``BadSample("bad_record", ...)``, whatever they hold.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Tuple

from mm1_megatron.data.shards.conversations import (
    IMAGE_MARKER,
    LLAVA_ROLES,
    ChatTemplate,
    Conversation,
    parse_llava_record,
    tokenize_conversation,
)
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.tokenizers.base import Tokenizer

ANSWER_KEYS = ("chosen", "rejected")
PreferenceConversations = Tuple[Conversation, Conversation]  # (chosen, rejected)


def parse_preference_record(record: Mapping[str, Any]) -> PreferenceConversations:
    """The chosen and the rejected conversation of a record (``BadSample`` if malformed)."""
    prompt = record.get("conversations")
    if not isinstance(prompt, list) or not prompt:
        raise BadSample("bad_record", "no 'conversations' list (the prompt)")
    if isinstance(prompt[-1], Mapping) and _role(prompt[-1]) not in (None, "user"):
        raise BadSample(
            "bad_record",
            "the prompt ('conversations') must end with a user turn; the answers are "
            "'chosen' and 'rejected'",
        )
    answers = [_answer_text(record, key) for key in ANSWER_KEYS]
    if " ".join(answers[0].split()) == " ".join(answers[1].split()):
        raise BadSample("bad_record", "'chosen' and 'rejected' are the same answer")
    pair = []
    for answer in answers:
        turns = [*prompt, {"from": "gpt", "value": answer}]
        pair.append(parse_llava_record({**record, "conversations": turns}))
    return pair[0], pair[1]


def _role(turn: Mapping[str, Any]):
    """Our role of a LLaVA turn, None when its speaker is unknown (or not text)."""
    speaker = turn.get("from")
    return LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None


def _answer_text(record: Mapping[str, Any], key: str) -> str:
    answer = record.get(key)
    if isinstance(answer, Mapping) and _role(answer) == "assistant":
        answer = answer.get("value")
    if not isinstance(answer, str) or not answer.strip():
        raise BadSample(
            "bad_record",
            f"'{key}' must be the answer's text (or one assistant turn), got {answer!r:.80}",
        )
    if IMAGE_MARKER in answer:
        raise BadSample("bad_record", f"'{key}' holds an {IMAGE_MARKER} marker")
    return answer


def last_answer_only(targets: List[bool]) -> List[bool]:
    """``targets`` with only the last run of trained tokens kept (the final answer and
    its end-of-turn marker; answers hold no image, so that run is unbroken)."""
    end = max(i for i, trained in enumerate(targets) if trained) + 1
    start = end
    while start > 0 and targets[start - 1]:
        start -= 1
    return [start <= i < end for i in range(len(targets))]


def tokenize_answer(
    conversation: Conversation, template: ChatTemplate, tokenizer: Tokenizer
) -> Tuple[List[int], List[bool]]:
    """Token ids and per-token targets of one side of a pair: its last answer only."""
    ids, targets = tokenize_conversation(conversation, template, tokenizer)
    return ids, last_answer_only(targets)
