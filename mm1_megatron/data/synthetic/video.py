"""Synthetic videos: short clips of the synthetic world where something happens.

A clip is ``num_frames`` frames (scenes of ``world.py``) sampled at one frame per second
on one background: a subject shape and, sometimes, a still distractor in another cell.
One event per clip, each readable only from several frames:

- ``move``: the subject glides two cells left, right, up or down, evenly over the clip
  (``the red circle moves right .``): one frame shows where it is, not where it goes;
- ``turn``: the subject changes colour from frame ``k >= 1`` on (``the red circle turns
  blue .``): the first frames name it, a later one gives the answer;
- ``appear``: the subject is absent before frame ``k >= 1`` (``a red circle appears at
  time two .``): the answer is the first frame that shows it.

Its text (``clip_words``) puts a frame-time marker before each frame's image,
``time zero : <image> time one : <image> ...``, then the event sentence. Every draw comes
from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy as np

from mm1_megatron.data.pipeline.packing import Sample
from mm1_megatron.data.synthetic.world import (
    CELL_NAMES,
    ImageSlot,
    Scene,
    ShapeSpec,
    SyntheticGenerator,
)
from mm1_megatron.data.tokenizers import base as vocab

SOURCE = "video"
EVENTS = ("move", "turn", "appear")
# Direction -> (columns, rows) one step moves.
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
PATH_CELLS = 2  # a moving shape crosses two cells: from one edge of the grid to the other
MIN_FRAMES = 2


@dataclass(frozen=True)
class Clip:
    """A clip's frames and what happens in it. ``subject``: the moving, turning or
    appearing shape as first seen, ``(colour, shape)``; ``answer``: the direction, the
    new colour, or the number word of the second at which the subject appears."""

    frames: Tuple[Scene, ...]
    event: str
    subject: Tuple[str, str]
    answer: str


# Whole seconds as the synthetic vocabulary writes them: "zero", "one", ... "twenty".
SECOND_WORDS = ("zero", *vocab.NUMBER_WORDS)


def time_words(seconds: int) -> List[str]:
    """``time zero :`` / ``time three :``: the marker before a frame's image."""
    return ["time", SECOND_WORDS[seconds], ":"]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _path_start(rng: np.random.Generator, direction: str) -> int:
    """A start cell from which ``PATH_CELLS`` steps in ``direction`` stay on the grid."""
    dx, dy = DIRECTIONS[direction]
    cols = [c for c in range(3) if 0 <= c + PATH_CELLS * dx < 3]
    rows = [r for r in range(3) if 0 <= r + PATH_CELLS * dy < 3]
    return 3 * _pick(rng, rows) + _pick(rng, cols)


def _path(cell: int, direction: str) -> List[int]:
    row, col = divmod(cell, 3)
    dx, dy = DIRECTIONS[direction]
    return [3 * (row + i * dy) + col + i * dx for i in range(PATH_CELLS + 1)]


def _distractor(rng, avoid_cells, subject: Tuple[str, str]) -> Optional[ShapeSpec]:
    """A still shape in a free cell, never of the subject's colour and kind; None half the
    time."""
    if rng.random() < 0.5:
        return None
    free = [c for c in range(len(CELL_NAMES)) if c not in avoid_cells]
    while True:
        colour = _pick(rng, vocab.SHAPE_COLOUR_WORDS)
        shape = _pick(rng, vocab.SHAPE_WORDS)
        if (colour, shape) != subject:
            return ShapeSpec(colour, shape, _pick(rng, free))


def random_clip(rng: np.random.Generator, num_frames: int) -> Clip:
    if num_frames < MIN_FRAMES or num_frames > len(vocab.NUMBER_WORDS) + 1:
        raise ValueError(
            f"a synthetic clip has {MIN_FRAMES} to {len(vocab.NUMBER_WORDS) + 1} frames, "
            f"not {num_frames}"
        )
    background = _pick(rng, vocab.BACKGROUND_WORDS)
    event = _pick(rng, EVENTS)
    colour, shape = _pick(rng, vocab.SHAPE_COLOUR_WORDS), _pick(rng, vocab.SHAPE_WORDS)
    if event == "move":
        direction = _pick(rng, tuple(DIRECTIONS))
        cell = _path_start(rng, direction)
        avoid, answer = _path(cell, direction), direction
    else:
        cell = int(rng.integers(len(CELL_NAMES)))
        avoid = [cell]
        change = int(rng.integers(1, num_frames))
        if event == "turn":
            others = [c for c in vocab.SHAPE_COLOUR_WORDS if c != colour]
            answer = _pick(rng, others)
        else:
            answer = vocab.NUMBER_WORDS[change - 1]
    still = _distractor(rng, avoid, (colour, shape))
    frames = []
    for index in range(num_frames):
        subject = ShapeSpec(colour, shape, cell)
        if event == "move":
            dx, dy = DIRECTIONS[direction]
            travelled = PATH_CELLS * index / (num_frames - 1)
            offsets = dict(offset_x=dx * travelled, offset_y=dy * travelled)
            subject = ShapeSpec(colour, shape, cell, **offsets)
        elif event == "turn" and index >= change:
            subject = ShapeSpec(answer, shape, cell)
        elif event == "appear" and index < change:
            subject = None
        shapes = [s for s in (subject, still) if s is not None]
        frames.append(Scene(background, tuple(sorted(shapes, key=lambda s: s.cell))))
    return Clip(tuple(frames), event, (colour, shape), answer)


def event_words(clip: Clip) -> List[str]:
    colour, shape = clip.subject
    if clip.event == "move":
        return ["the", colour, shape, "moves", clip.answer, "."]
    if clip.event == "turn":
        return ["the", colour, shape, "turns", clip.answer, "."]
    article = "an" if colour[0] in "aeiou" else "a"
    return [article, colour, shape, "appears", "at", "time", clip.answer, "."]


def clip_words(clip: Clip) -> List[Optional[str]]:
    """Frame markers and image slots, then the event sentence."""
    words: List[Optional[str]] = []
    for seconds in range(len(clip.frames)):
        words += [*time_words(seconds), ImageSlot]
    return words + event_words(clip)


def video_cloze(clip: Clip) -> Tuple[str, str]:
    """``(question, answer)``: the event sentence up to its answer word, and that word."""
    words = event_words(clip)
    position = words.index(clip.answer)
    return " ".join(words[:position]), clip.answer


def video_samples(
    generator: SyntheticGenerator, rng: np.random.Generator, num_frames: int
) -> Iterator[Sample]:
    """Endless ``video`` samples: each a clip's markers, frames and event sentence."""
    while True:
        clip = random_clip(rng, num_frames)
        frames = generator.draw_frames(clip.frames, rng)
        yield generator.build_sample(SOURCE, clip_words(clip), frames)
