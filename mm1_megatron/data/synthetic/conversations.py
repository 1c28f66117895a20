"""Synthetic multi-turn conversations about generated scenes (the SFT source of the
embedded world, so instruction tuning runs with no download).

Each conversation shows one scene (its ``<image>`` in the first user turn) and asks 2-4
questions drawn from five kinds, every answer readable from the pixels:

- ``how many shapes ?`` -> ``there are two shapes .``
- ``describe the picture .`` -> the scene's caption;
- ``what is at the top left ?`` -> ``a red circle .`` or ``nothing .`` (any cell);
- ``where is the red circle ?`` -> ``at the top left .`` (only shapes whose colour and
  kind are unique in the scene are asked about);
- ``is there a blue square ?`` -> ``yes .`` or ``no .``

Every conversation has its image; text-only data comes from the text source.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from mm1_megatron.data.shards.conversations import IMAGE_MARKER, Conversation, Turn
from mm1_megatron.data.synthetic.world import (
    CELL_NAMES,
    COLOUR_RGB,
    Scene,
    caption_words,
    count_words,
    random_scene,
)
from mm1_megatron.data.tokenizers import base as vocab

QUESTION_KINDS = ("count", "describe", "what_at", "where", "is_there")


def _article(colour: str) -> str:
    return "an" if colour[0] in "aeiou" else "a"


def answer_phrase(colour: str, shape: str) -> str:
    """``a red circle .`` / ``an orange square .``"""
    return f"{_article(colour)} {colour} {shape} ."


def question(
    scene: Scene, kind: str, rng: np.random.Generator
) -> Tuple[str, str, str, Optional[int]]:
    """``(kind asked, question, answer, cell asked about)``: ``where`` becomes
    ``is_there`` in a scene with no shape unique in colour and kind; the cell is the one
    ``what_at`` names or ``where`` answers, else None."""
    if kind == "count":
        return kind, "how many shapes ?", " ".join(count_words(len(scene.shapes))) + " .", None
    if kind == "describe":
        return kind, "describe the picture .", " ".join(caption_words(scene)), None
    if kind == "what_at":
        cell = int(rng.integers(len(CELL_NAMES)))
        found = [spec for spec in scene.shapes if spec.cell == cell]
        answer = answer_phrase(found[0].colour, found[0].shape) if found else "nothing ."
        return kind, f"what is at the {' '.join(CELL_NAMES[cell])} ?", answer, cell
    kinds = [(spec.colour, spec.shape) for spec in scene.shapes]
    unique = [spec for spec in scene.shapes if kinds.count((spec.colour, spec.shape)) == 1]
    if kind == "where" and unique:  # (with no unique shape, asks is_there instead)
        spec = unique[int(rng.integers(len(unique)))]
        text = f"where is the {spec.colour} {spec.shape} ?"
        return kind, text, f"at the {' '.join(CELL_NAMES[spec.cell])} .", spec.cell
    assert kind in ("is_there", "where"), kind
    colour = str(rng.choice(list(COLOUR_RGB)))
    shape = str(rng.choice(vocab.SHAPE_WORDS))
    present = any(spec.colour == colour and spec.shape == shape for spec in scene.shapes)
    text = f"is there {_article(colour)} {colour} {shape} ?"
    return "is_there", text, "yes ." if present else "no .", None


def synthetic_conversation(
    rng: np.random.Generator, *, max_shapes: int = 3, min_turns: int = 2, max_turns: int = 4
) -> Tuple[Conversation, Scene]:
    """One conversation (``Conversation.images`` names the scene ``"scene"``) and its scene."""
    if not 1 <= min_turns <= max_turns:
        raise ValueError(f"need 1 <= min_turns <= max_turns, got {min_turns} and {max_turns}")
    scene = random_scene(rng, max_shapes)
    num_questions = int(rng.integers(min_turns, max_turns + 1))
    turns: List[Turn] = []
    for index in range(num_questions):
        kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
        _, text, answer, _ = question(scene, kind, rng)
        if index == 0:
            text = f"{IMAGE_MARKER} {text}"
        turns += [Turn("user", text), Turn("assistant", answer)]
    return Conversation(tuple(turns), ("scene",)), scene
