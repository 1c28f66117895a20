"""The MoE debug model trains on CPU and logs its router losses."""

from __future__ import annotations

import json
import math

from tests.in_process import train_in_process

MOE = ["model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2"]


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def _train(output_dir, *overrides):
    return train_in_process(f"logging.output_dir={output_dir}", *overrides)


def test_moe_aux_losses_are_logged_and_affect_training(tmp_path):
    with_aux = _train(tmp_path / "aux", "training.train_steps=3", *MOE)
    without_aux = _train(
        tmp_path / "no_aux",
        "training.train_steps=3",
        *MOE,
        "model.llm.moe.aux_loss_coeff=0",
        "model.llm.moe.z_loss_coeff=0",
    )
    assert with_aux.returncode == 0, with_aux.log[-3000:]
    assert without_aux.returncode == 0, without_aux.log[-3000:]
    steps = _metrics(tmp_path / "aux")
    for step in steps:
        # Balanced routing gives a load-balancing loss of about 1 (top-k x experts x
        # sum of fraction x probability); the z-loss is a positive squared log-sum-exp.
        assert 0.5 < step["moe/load_balancing_loss"] < 4.0
        assert step["moe/z_loss"] > 0 and math.isfinite(step["moe/z_loss"])
    baseline = _metrics(tmp_path / "no_aux")
    assert "moe/load_balancing_loss" not in baseline[0]
    # The language-model loss of step 1 is the same (same weights, same data) but the
    # auxiliary losses add gradient.
    assert steps[0]["loss"] == baseline[0]["loss"]
    assert steps[0]["grad_norm"] != baseline[0]["grad_norm"]
