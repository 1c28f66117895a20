"""Three tasks drawn from the embedded synthetic world (``data/synthetic/world.py``,
``data/synthetic/video.py``).

``synthetic_caption``: caption a scene; the reference is its training caption
(``there are two shapes on a gray background : a red circle at the top left and ...``).

``synthetic_vqa``: the debug model never saw a question format (its training text is only
captions, interleaved descriptions and templated sentences), so its questions are cloze
prompts in the training text's own words: a prefix of the scene's caption whose answer is
the caption's next word. Four kinds, in turn by example index:

- ``count``: ``there are`` -> the number word (``there is`` -> ``one``);
- ``background``: ``there are two shapes on a`` -> the background colour;
- ``colour``: ``... background : a`` (or ``an``) -> the first shape's colour;
- ``shape``: ``... background : a red`` -> the first shape's kind.

``synthetic_video_qa``: clips of ``VIDEO_FRAMES`` frames (``data/synthetic/video.py``),
each asking its event sentence's answer word as a cloze, in the training text's words:
``the red circle moves`` -> ``right``, ``the red circle turns`` -> ``blue``, ``a red
circle appears at time`` -> ``two``. Each answer needs several frames.

Scenes and clips come from ``numpy.random.default_rng([seed, SYNTHETIC_TAG, task, stream])``:
evaluation and demonstrations use different streams (and a demo scene equal to an
evaluation scene is dropped), and none is a training stream (``default_rng([seed, g])``).
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from mm1_megatron.data.synthetic.video import Clip, random_clip, video_cloze
from mm1_megatron.data.synthetic.world import Scene, caption_words, random_scene
from mm1_megatron.evaluation.tasks.records import EvalExample

SYNTHETIC_TAG = 0x45564131  # "EVA1": keeps these streams apart from every training stream
CAPTION_TASK, VQA_TASK, VIDEO_QA_TASK = 1, 2, 3
VIDEO_FRAMES = 4  # data.video.num_frames's default: what configs/debug_video.yaml trains on
EVAL_STREAM, DEMO_STREAM = 0, 1
DEFAULT_NUM_EVAL = 200
DEFAULT_NUM_DEMOS = 512
VQA_KINDS: Tuple[str, ...] = ("count", "background", "colour", "shape")
VQA_NUM_ANSWERS = 10

Examples = List[EvalExample]


def _scenes(seed: int, task: int, stream: int, count: int) -> List:
    """``count`` scenes of ``task``'s ``stream`` (clips for the video task)."""
    rng = np.random.default_rng([seed, SYNTHETIC_TAG, task, stream])
    if task == VIDEO_QA_TASK:
        return [random_clip(rng, VIDEO_FRAMES) for _ in range(count)]
    return [random_scene(rng) for _ in range(count)]


def _eval_and_demo_scenes(seed: int, task: int, num_eval: int, num_demos: int) -> Tuple[List, List]:
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0 (it seeds numpy's SeedSequence)")
    if num_eval < 1 or num_demos < 0:
        raise ValueError(f"need num_eval >= 1 and num_demos >= 0, got {num_eval}, {num_demos}")
    eval_scenes = _scenes(seed, task, EVAL_STREAM, num_eval)
    taken = set(eval_scenes)
    demos = [s for s in _scenes(seed, task, DEMO_STREAM, num_demos) if s not in taken]
    return eval_scenes, demos


def cloze(scene: Scene, kind: str) -> Tuple[str, str]:
    """``(question, answer)``: a prefix of the scene's caption and the word after it."""
    words = caption_words(scene)
    colon = words.index(":")
    positions = {"count": 2, "background": colon - 2, "colour": colon + 2, "shape": colon + 3}
    if kind not in positions:
        raise ValueError(f"unknown cloze kind {kind!r}; expected one of {VQA_KINDS}")
    position = positions[kind]
    return " ".join(words[:position]), words[position]


def synthetic_caption(
    seed: int = 0, num_eval: int = DEFAULT_NUM_EVAL, num_demos: int = DEFAULT_NUM_DEMOS
) -> Tuple[Examples, Examples]:
    """``(eval, demos)``: scenes with their training caption as the one reference."""
    eval_scenes, demo_scenes = _eval_and_demo_scenes(seed, CAPTION_TASK, num_eval, num_demos)

    def example(prefix: str, index: int, scene: Scene) -> EvalExample:
        return EvalExample(f"{prefix}{index:05d}", scene, (" ".join(caption_words(scene)),))

    return (
        [example("", i, scene) for i, scene in enumerate(eval_scenes)],
        [example("demo-", i, scene) for i, scene in enumerate(demo_scenes)],
    )


def synthetic_vqa(
    seed: int = 0, num_eval: int = DEFAULT_NUM_EVAL, num_demos: int = DEFAULT_NUM_DEMOS
) -> Tuple[Examples, Examples]:
    """``(eval, demos)``: cloze questions (see the module docstring), kinds in turn; the
    answer word is repeated 10 times, like ten agreeing VQAv2 annotators."""
    eval_scenes, demo_scenes = _eval_and_demo_scenes(seed, VQA_TASK, num_eval, num_demos)

    def example(prefix: str, index: int, scene: Scene) -> EvalExample:
        question, answer = cloze(scene, VQA_KINDS[index % len(VQA_KINDS)])
        answers = (answer,) * VQA_NUM_ANSWERS
        return EvalExample(f"{prefix}{index:05d}", scene, answers, question)

    return (
        [example("", i, scene) for i, scene in enumerate(eval_scenes)],
        [example("demo-", i, scene) for i, scene in enumerate(demo_scenes)],
    )


def synthetic_video_qa(
    seed: int = 0, num_eval: int = DEFAULT_NUM_EVAL, num_demos: int = DEFAULT_NUM_DEMOS
) -> Tuple[Examples, Examples]:
    """``(eval, demos)``: one cloze per clip (see the module docstring); a demo clip equal
    to an evaluation clip is dropped."""
    eval_clips, demo_clips = _eval_and_demo_scenes(seed, VIDEO_QA_TASK, num_eval, num_demos)

    def example(prefix: str, index: int, clip: Clip) -> EvalExample:
        question, answer = video_cloze(clip)
        return EvalExample(f"{prefix}{index:05d}", clip, (answer,) * VQA_NUM_ANSWERS, question)

    return (
        [example("", i, clip) for i, clip in enumerate(eval_clips)],
        [example("demo-", i, clip) for i, clip in enumerate(demo_clips)],
    )
