"""``configs/debug_qwen3_siglip2.yaml`` (a SigLIP stem and a Qwen3 decoder: q/k norms, a
head width of its own) trains on CPU as ``configs/debug.yaml`` does."""

from __future__ import annotations

import json

from tests.in_process import train_in_process

NUM_STEPS = 30


def test_debug_qwen3_siglip2_recipe_trains(tmp_path):
    result = train_in_process(
        f"logging.output_dir={tmp_path}",
        f"training.train_steps={NUM_STEPS}",
        "logging.progress_bar=false",
        config="configs/debug_qwen3_siglip2.yaml",
    )
    assert result.returncode == 0, result.log[-4000:]
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == NUM_STEPS
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"loss went from {start:.3f} to {end:.3f}"
