"""The synthetic videos (``data/synthetic/video.py``): each event is what the drawn frames
show, read back from the pixels; the text puts a time marker before every frame; the
synthetic data source packs whole clips; and ``synthetic_video_qa`` prompts a clip as
training shows it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm1_megatron.data.synthetic.video import (
    DIRECTIONS,
    clip_words,
    random_clip,
    time_words,
    video_cloze,
)
from mm1_megatron.data.synthetic.world import COLOUR_RGB, ImageSlot, draw_scene
from mm1_megatron.data.tokenizers import base as vocab

SIZE = 60
FRAMES = 4


def _clips(event: str, count: int = 12, frames: int = FRAMES):
    rng = np.random.default_rng(5)
    found = []
    while len(found) < count:
        clip = random_clip(rng, frames)
        # Keep clips whose still shape shares no colour with the subject (before or after
        # a turn): pixels of those colours are then the subject's alone.
        still = [s.colour for s in clip.frames[0].shapes if s.colour != clip.subject[0]]
        crowded = len(clip.frames[0].shapes) - len(still) > 1
        if clip.event == event and not crowded and clip.answer not in still:
            found.append(clip)
    return found


def _pixels_of(image: torch.Tensor, colour: str) -> torch.Tensor:
    rgb = torch.tensor(COLOUR_RGB[colour]).view(3, 1, 1)
    return (image == rgb).all(dim=0)


def _centroid(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = mask.nonzero(as_tuple=True)
    return torch.stack([xs.float().mean(), ys.float().mean()])


def test_a_moving_shape_travels_in_the_named_direction_frame_by_frame():
    for clip in _clips("move"):
        colour = clip.subject[0]
        centres = [_centroid(_pixels_of(draw_scene(f, SIZE), colour)) for f in clip.frames]
        dx, dy = DIRECTIONS[clip.answer]
        steps = [b - a for a, b in zip(centres, centres[1:])]
        for step in steps:  # each frame moves on, along the named axis only
            assert float(step[0]) * dx + float(step[1]) * dy > SIZE / 12
            assert abs(float(step[0]) * dy) + abs(float(step[1]) * dx) < 1.0
        # Two cells in all: from one edge column (row) of the grid to the other.
        travelled = centres[-1] - centres[0]
        assert float(travelled.abs().max()) == pytest.approx(2 * SIZE / 3, abs=2.0)


def test_a_turning_shape_shows_its_first_colour_then_the_answer():
    for clip in _clips("turn"):
        colour, new = clip.subject[0], clip.answer
        drawn = [draw_scene(frame, SIZE) for frame in clip.frames]
        shown = [(bool(_pixels_of(d, colour).any()), bool(_pixels_of(d, new).any())) for d in drawn]
        change = next(i for i, (_, turned) in enumerate(shown) if turned)
        assert change >= 1, "the first frame names the shape by its first colour"
        assert all(old and not turned for old, turned in shown[:change])
        assert all(turned and not old for old, turned in shown[change:])


def test_an_appearing_shape_is_first_seen_at_the_time_the_answer_names():
    for clip in _clips("appear"):
        seen = [_pixels_of(draw_scene(f, SIZE), clip.subject[0]).any().item() for f in clip.frames]
        first = seen.index(True)
        assert not any(seen[:first]) and all(seen[first:])
        assert clip.answer == vocab.NUMBER_WORDS[first - 1]  # "appears at time two": frame 2


@pytest.mark.parametrize("frames", [2, 4, 7])
def test_every_frame_follows_its_time_marker_and_the_cloze_is_the_event_sentence(frames):
    rng = np.random.default_rng(frames)
    for _ in range(20):
        clip = random_clip(rng, frames)
        words = clip_words(clip)
        slots = [i for i, w in enumerate(words) if w is ImageSlot]
        assert len(slots) == frames == len(clip.frames)
        for seconds, slot in enumerate(slots):
            assert words[slot - 3 : slot] == time_words(seconds)
        question, answer = video_cloze(clip)
        sentence = " ".join(w for w in words[slots[-1] + 1 :])
        assert sentence.startswith(f"{question} {answer} ")
        assert answer == clip.answer


def test_clips_are_pure_functions_of_the_generator_and_the_frame_count_is_checked():
    first = [random_clip(np.random.default_rng(3), 4) for _ in range(2)]
    assert first[0] == first[1]
    with pytest.raises(ValueError, match="2 to 21 frames"):
        random_clip(np.random.default_rng(0), 1)


def test_the_synthetic_source_packs_whole_clips_with_their_markers():
    from mm1_megatron.data.synthetic.sequences import SyntheticSequences
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

    tok = SyntheticTokenizer()
    sequences = SyntheticSequences(
        {"video": 1.0},
        seq_length=256,
        num_image_tokens=4,
        max_images=32,
        image_size=56,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        seed=0,
        video_frames=FRAMES,
    )
    for index in range(3):
        packed, _ = sequences.sequence(index)
        assert packed.source == "video"
        tokens = packed.tokens.tolist()
        num_slots = tokens.count(tok.image_token_id)
        assert packed.images.shape[0] * 4 == num_slots
        assert packed.images.shape[0] % FRAMES == 0 and packed.images.shape[0] > 0
        # Every frame follows its marker "time <seconds> :" (an appearing shape's sentence
        # says "at time two ." besides).
        time, colon = tok.encode("time")[0], tok.encode(":")[0]
        markers = [i for i, t in enumerate(tokens[:-2]) if t == time and tokens[i + 2] == colon]
        assert len(markers) == packed.images.shape[0]
        assert all(tokens[i + 3] == tok.image_token_id for i in markers)


def test_video_prompts_show_each_frame_after_its_marker_as_training_does():
    from mm1_megatron.config import load_config
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from mm1_megatron.evaluation.prompting import PromptBuilder
    from mm1_megatron.evaluation.protocol import Protocol
    from mm1_megatron.evaluation.tasks import load_task

    task = load_task("synthetic_video_qa", limit=4)
    assert task.family == "vqa" and len(task.eval_examples) == 4
    tok = SyntheticTokenizer()
    builder = PromptBuilder(load_config("configs/debug_video.yaml"), tok)
    protocol = Protocol()
    template = protocol.templates[protocol.template_key(task.name, task.family)]
    query, demo = task.eval_examples[0], task.demo_examples[0]
    prompt = builder.build(template, task.family, query, [demo])
    assert prompt.images.shape[0] == 2 * FRAMES
    text = tok.decode(prompt.token_ids)
    assert text.count("time zero :") == 2
    assert text.rstrip().endswith(query.question)
    with pytest.raises(ValueError, match="is a video"):
        builder.image(query)
