"""``tools/video_probe.py``'s two pieces that decide its figures: where each clip's answer
is predicted, and the ablation that shows every clip only its first frame."""

from __future__ import annotations

import torch

from mm1_megatron.config import load_config
from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.tokenizers import base as vocab
from tests.conftest import CONFIG_DIR, REPO_ROOT
from tests.in_process import load_script

probe = load_script(REPO_ROOT / "tools" / "video_probe.py")


def _batch():
    cfg = load_config(CONFIG_DIR / "debug_video.yaml", ["data.mixture={video: 1.0}"])
    loader, tok = build_run_data(cfg)
    return cfg, next(iter(loader)), tok


def test_answer_positions_point_at_the_token_before_each_answer():
    cfg, batch, tok = _batch()
    words = {w: tok.encode(w)[0] for w in ("moves", "turns", "at", "appears")}
    answers = {
        "move": set(tok.encode(" ".join(probe.DIRECTIONS))),
        "turn": set(tok.encode(" ".join(vocab.SHAPE_COLOUR_WORDS))),
        "appear": set(tok.encode(" ".join(vocab.NUMBER_WORDS[:3]))),
    }
    found = 0
    for row in batch["tokens"].tolist():
        clips = row.count(tok.bos_token_id)
        positions = probe.answer_positions(row, words)
        assert len(positions) == clips  # one answer per clip
        for kind, pos in positions:
            assert row[pos + 1] in answers[kind], (kind, tok.decode(row[pos - 3 : pos + 2]))
        found += len(positions)
    assert found > 4


def test_first_frames_only_gives_each_clip_its_own_first_frame_everywhere():
    cfg, batch, tok = _batch()
    per_image = cfg.model.connector.num_output_tokens
    ablated = probe.first_frames_only(batch, tok.image_token_id, per_image)
    frames = cfg.data.video.num_frames
    assert batch["images"].shape[0] % frames == 0
    for clip in range(batch["images"].shape[0] // frames):
        first = batch["images"][clip * frames]
        for index in range(clip * frames, (clip + 1) * frames):
            assert torch.equal(ablated[index], first)
    # The clips' frames differed before (every clip has an event between its frames).
    assert not torch.equal(ablated, batch["images"])
