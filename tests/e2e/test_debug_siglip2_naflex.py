"""``configs/debug_siglip2_naflex.yaml`` (SigLIP 2's NaFlex tower: each image at its own
aspect ratio, packed patches, per-image attention) trains on CPU as ``debug.yaml`` does,
on synthetic images of several aspect ratios."""

from __future__ import annotations

import json

from tests.in_process import train_in_process

NUM_STEPS = 30


def test_debug_siglip2_naflex_recipe_trains(tmp_path):
    result = train_in_process(
        f"logging.output_dir={tmp_path}",
        f"training.train_steps={NUM_STEPS}",
        "logging.progress_bar=false",
        config="configs/debug_siglip2_naflex.yaml",
    )
    assert result.returncode == 0, result.log[-4000:]
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [step["loss"] for step in steps]
    assert len(losses) == NUM_STEPS
    assert sum(step["num_images"] for step in steps) > 0
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"loss went from {start:.3f} to {end:.3f}"
