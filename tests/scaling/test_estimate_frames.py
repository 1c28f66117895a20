"""``mm1 estimate --max-frames``: the most video frames per sequence that fit, checked
against the memory estimate of the sequence those frames make (and one frame more)."""

from __future__ import annotations

import json

import pytest

from mm1_megatron.config import load_config, validate_config
from mm1_megatron.scaling.estimate.estimator import layout_of
from mm1_megatron.scaling.estimate.frames_fit import MARKER_TOKENS, max_frames, video_seq_length
from mm1_megatron.scaling.estimate.hardware import gpu_type
from mm1_megatron.scaling.estimate.memory import estimate_memory
from mm1_megatron.scaling.estimate.seq_length_fit import at_seq_length
from mm1_megatron.scaling.estimate.workload import default_workload
from tests.conftest import CONFIG_DIR

MM1_30B = CONFIG_DIR / "mm1_30b.yaml"
H100 = gpu_type("h100")


def _peak(cfg, frames: int, text_tokens: int) -> float:
    longer = at_seq_length(cfg, video_seq_length(cfg, frames, text_tokens))
    return estimate_memory(longer, default_workload(longer, frames), num_gpus=64).peak


def test_a_video_sequence_is_its_frames_markers_and_text_rounded_to_the_layout():
    cfg = load_config(MM1_30B, ["parallel.context_parallel_size=4"])
    per_frame = cfg.model.connector.num_output_tokens + MARKER_TOKENS
    # CP 4 splits rows into 8 chunks, each a multiple of TP 4 with SP: 32 tokens.
    assert video_seq_length(cfg, 10, 64) == 32 * -(-(10 * per_frame + 64) // 32)
    assert video_seq_length(cfg, 10, 64) % 32 == 0


def test_the_most_frames_fit_and_one_more_does_not_and_cp_holds_more():
    answers = {}
    for cp in (1, 2, 4):
        cfg = load_config(MM1_30B, [f"parallel.context_parallel_size={cp}"])
        fit = max_frames(cfg, layout_of(cfg, 64), num_gpus=64, gpu=H100, memory_margin=0.1)
        usable = H100.memory_bytes * 0.9
        assert _peak(cfg, fit.frames, 64) <= usable < _peak(cfg, fit.frames + 1, 64), cp
        validate_config(at_seq_length(cfg, fit.seq_length))  # a length the run accepts
        answers[cp] = fit.frames
    assert answers[1] < answers[2] < answers[4], answers


def test_longer_text_leaves_room_for_fewer_frames_and_bad_counts_are_refused():
    cfg = load_config(MM1_30B)
    layout = layout_of(cfg, 64)
    short = max_frames(cfg, layout, num_gpus=64, gpu=H100, memory_margin=0.1, text_tokens=0)
    long = max_frames(cfg, layout, num_gpus=64, gpu=H100, memory_margin=0.1, text_tokens=4096)
    assert long.frames < short.frames
    with pytest.raises(ValueError, match="--video-text-tokens=-1 must be >= 0"):
        max_frames(cfg, layout, num_gpus=64, gpu=H100, memory_margin=0.1, text_tokens=-1)


def test_the_cli_prints_the_most_frames(capsys):
    from mm1_megatron.scaling.estimate.cli import main

    argv = ["--config", str(MM1_30B), "--max-frames", "parallel.context_parallel_size=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Most video frames per sequence that fit on H100" in out
    assert "TP4 CP2 PP4 DP1 selective" in out and " frames (" in out
    assert main([*argv, "--json", "--video-text-tokens", "128"]) == 0
    (fit,) = json.loads(capsys.readouterr().out)["max_frames"]
    assert fit["layout"]["cp"] == 2 and fit["max_frames"] > 1
    assert fit["tokens_per_frame"] == 144 + MARKER_TOKENS
