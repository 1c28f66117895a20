"""Synthetic conversations: every answer is true of the scene, and they tokenize."""

from __future__ import annotations

import numpy as np

from mm1_megatron.data.shards.conversations import (
    ChatTemplate,
    target_tokens,
    tokenize_conversation,
)
from mm1_megatron.data.synthetic.conversations import synthetic_conversation
from mm1_megatron.data.synthetic.world import CELL_NAMES, caption_words
from mm1_megatron.data.tokenizers import base as vocab
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

TOK = SyntheticTokenizer()


def _check_answer(scene, question: str, answer: str) -> str:
    words = question.replace("<image>", "").split()
    shapes = {(s.colour, s.shape): s for s in scene.shapes}
    if words[:2] == ["how", "many"]:
        assert vocab.NUMBER_WORDS.index(answer.split()[2]) + 1 == len(scene.shapes)
        return "count"
    if words[0] == "describe":
        assert answer.split() == caption_words(scene)
        return "describe"
    if words[:2] == ["what", "is"]:
        cell = CELL_NAMES.index(tuple(words[4:-1]))
        here = [s for s in scene.shapes if s.cell == cell]
        assert answer == (
            f"{answer.split()[0]} {here[0].colour} {here[0].shape} ." if here else "nothing ."
        )
        return "what_at"
    if words[0] == "where":
        spec = shapes[(words[3], words[4])]
        assert answer == f"at the {' '.join(CELL_NAMES[spec.cell])} ."
        assert sum(1 for s in scene.shapes if (s.colour, s.shape) == (spec.colour, spec.shape)) == 1
        return "where"
    assert words[:2] == ["is", "there"], question
    assert answer == ("yes ." if (words[3], words[4]) in shapes else "no .")
    return "is_there"


def test_every_answer_is_true_of_the_scene_and_tokenizes():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(200):
        conversation, scene = synthetic_conversation(rng)
        turns = conversation.turns
        assert 4 <= len(turns) <= 8 and conversation.images == ("scene",)
        assert turns[0].text.startswith("<image> ") and conversation.num_image_markers == 1
        for question, answer in zip(turns[::2], turns[1::2]):
            assert (question.role, answer.role) == ("user", "assistant")
            kinds.add(_check_answer(scene, question.text, answer.text))
        ids, targets = tokenize_conversation(conversation, ChatTemplate(), TOK)
        answers = " <end_turn> ".join(turn.text for turn in turns[1::2]) + " <end_turn>"
        assert TOK.decode(target_tokens(ids, targets)) == answers
    assert kinds == {"count", "describe", "what_at", "where", "is_there"}
