"""A PP=2 run of the real command (``mm1 train``'s ``main`` on the session's pool of two
ranks, as torchrun runs it): per-step console lines come from the last stage, and a MoE
model whose first stage has no MoE layer finishes (its router-loss all-reduce over the
pipeline group used to be skipped there, hanging the other stage)."""

from __future__ import annotations

import json

from tests.rank_pool import train_on_pool


def test_pp2_moe_run_with_a_stage_without_moe_layers(tmp_path):
    # 4 decoder layers, MoE on every 4th (layer 4 only): with PP=2 the first stage holds
    # layers 1-2 and records no router loss.
    result = train_on_pool(
        "parallel.pipeline_parallel_size=2",
        "model.llm.moe.num_experts=4",
        "model.llm.moe.layer_frequency=4",
        "training.train_steps=3",
        "logging.log_interval=1",
        "logging.tensorboard=false",
        f"logging.output_dir={tmp_path}",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    step_lines = [
        line
        for line in result.stderr.splitlines()
        if "mm1_megatron.train" in line and "| loss" in line
    ]
    assert len(step_lines) >= 3, result.stderr[-3000:]
    assert all("[rank 1]" in line for line in step_lines)  # the last stage logs them
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert all(0.5 < row["moe/load_balancing_loss"] < 4.0 for row in rows)
