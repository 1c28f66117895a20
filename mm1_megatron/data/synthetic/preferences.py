"""Synthetic preference pairs about generated scenes (the DPO source of the embedded world).

Each pair shows one scene. Half the pairs are captions (the image then its caption, as
in pre-training: the right one, and one with a single fact changed); the others are
conversations asking one question, whose chosen answer is what the pixels say and whose
rejected one differs in exactly one fact, so only looking at the image tells them apart:

- ``how many shapes ?`` -> ``there are two shapes .`` / ``there are three shapes .``
- ``describe the picture .`` -> the caption / the caption with one fact changed (the
  count, the background, or one shape's colour or kind);
- ``what is at the top left ?`` -> ``a red circle .`` / ``a blue circle .`` (or
  ``nothing .`` where there is a shape, and a shape where there is none);
- ``where is the red circle ?`` -> ``at the top left .`` / ``at the center .``
- ``is there a blue square ?`` -> ``yes .`` / ``no .``

The questions and answers are the SFT conversations' (``conversations.py``), so a model
fine-tuned on those is the natural starting point.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import numpy as np

from mm1_megatron.data.shards.conversations import IMAGE_MARKER
from mm1_megatron.data.synthetic.conversations import QUESTION_KINDS, answer_phrase, question
from mm1_megatron.data.synthetic.world import (
    CELL_NAMES,
    Scene,
    ShapeSpec,
    caption_words,
    count_words,
    random_scene,
)
from mm1_megatron.data.tokenizers import base as vocab

# Pairs that are captions, not conversations: the image then its caption, right or with
# one fact changed (the pre-training caption format, which few-shot prompts also use).
CAPTION_SHARE = 0.5


class PreferencePair(NamedTuple):
    prompt: Optional[str]  # the user turn, with the image marker; None: a caption pair
    chosen: str
    rejected: str
    scene: Scene


def _other(options, current, rng: np.random.Generator):
    choices = [option for option in options if option != current]
    return choices[int(rng.integers(len(choices)))]


def _changed_scene(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with one fact of its caption changed."""
    change = ("count", "background", "colour", "shape")[int(rng.integers(4))]
    shapes = list(scene.shapes)
    if change == "background":
        background = _other(vocab.BACKGROUND_WORDS, scene.background, rng)
        return dataclasses.replace(scene, background=background)
    if change == "count":
        if len(shapes) > 1 and rng.random() < 0.5:
            del shapes[int(rng.integers(len(shapes)))]
        else:
            free = [c for c in range(len(CELL_NAMES)) if c not in {s.cell for s in shapes}]
            colour = vocab.SHAPE_COLOUR_WORDS[int(rng.integers(len(vocab.SHAPE_COLOUR_WORDS)))]
            shape = vocab.SHAPE_WORDS[int(rng.integers(len(vocab.SHAPE_WORDS)))]
            shapes.append(ShapeSpec(colour, shape, free[int(rng.integers(len(free)))]))
        return dataclasses.replace(scene, shapes=tuple(sorted(shapes, key=lambda s: s.cell)))
    index = int(rng.integers(len(shapes)))
    spec = shapes[index]
    if change == "colour":
        spec = dataclasses.replace(spec, colour=_other(vocab.SHAPE_COLOUR_WORDS, spec.colour, rng))
    else:
        spec = dataclasses.replace(spec, shape=_other(vocab.SHAPE_WORDS, spec.shape, rng))
    shapes[index] = spec
    return dataclasses.replace(scene, shapes=tuple(shapes))


def _wrong_object(found: Tuple[ShapeSpec, ...], rng: np.random.Generator) -> str:
    if not found:
        colour = vocab.SHAPE_COLOUR_WORDS[int(rng.integers(len(vocab.SHAPE_COLOUR_WORDS)))]
        return answer_phrase(colour, vocab.SHAPE_WORDS[int(rng.integers(len(vocab.SHAPE_WORDS)))])
    spec = found[0]
    if rng.random() < 0.25:
        return "nothing ."
    if rng.random() < 0.5:
        return answer_phrase(_other(vocab.SHAPE_COLOUR_WORDS, spec.colour, rng), spec.shape)
    return answer_phrase(spec.colour, _other(vocab.SHAPE_WORDS, spec.shape, rng))


def _rejected(scene: Scene, kind: str, asked, chosen: str, rng: np.random.Generator) -> str:
    if kind == "count":
        wrong = _other(range(1, 5), len(scene.shapes), rng)  # scenes have 1-3 shapes
        return " ".join(count_words(wrong)) + " ."
    if kind == "describe":
        return " ".join(caption_words(_changed_scene(scene, rng)))
    if kind == "what_at":
        return _wrong_object(tuple(s for s in scene.shapes if s.cell == asked), rng)
    if kind == "where":
        return f"at the {' '.join(CELL_NAMES[_other(range(len(CELL_NAMES)), asked, rng)])} ."
    return "no ." if chosen == "yes ." else "yes ."


def synthetic_preference(rng: np.random.Generator, *, max_shapes: int = 3) -> PreferencePair:
    """One pair: a scene, a question of a random kind, the right and a wrong answer."""
    scene = random_scene(rng, max_shapes)
    if rng.random() < CAPTION_SHARE:
        chosen = " ".join(caption_words(scene))
        return PreferencePair(None, chosen, _rejected(scene, "describe", None, chosen, rng), scene)
    kind = QUESTION_KINDS[int(rng.integers(len(QUESTION_KINDS)))]
    asked_kind, text, chosen, asked = question(scene, kind, rng)
    rejected = _rejected(scene, asked_kind, asked, chosen, rng)
    assert rejected != chosen, (asked_kind, chosen)
    return PreferencePair(f"{IMAGE_MARKER} {text}", chosen, rejected, scene)
