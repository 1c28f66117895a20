"""End-to-end: the README's main command trains the debug config on CPU (in a child
process, as a user runs it); the config checks run ``mm1 train`` in this process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.in_process import train_in_process
from tests.launch import run_train

REPO = Path(__file__).resolve().parents[2]
NUM_STEPS = 30  # also the golden single-process run (tests/golden/debug_30_steps.json)


def _train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_train(f"logging.output_dir={output_dir}", *overrides)


def _scalars(output_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def debug_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("debug_run")
    result = _train(
        output_dir,
        f"training.train_steps={NUM_STEPS}",
        "logging.log_interval=20",
        "logging.peak_flops_per_device=1e11",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir, result


def test_loss_falls_clearly(debug_run):
    output_dir, _ = debug_run
    losses = _scalars(output_dir)["loss"]
    assert len(losses) == NUM_STEPS
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.5 * start, f"loss went from {start:.3f} to {end:.3f}"


def test_the_run_matches_the_golden_values(debug_run):
    """The single-process entry of the golden file (tests/e2e/test_golden_values.py has
    the others and explains the tolerance); this run is the same command, so it is not
    repeated there."""
    from tests.golden.runs import GOLDEN_FILE

    output_dir, _ = debug_run
    golden = json.loads(GOLDEN_FILE.read_text())["runs"]["single"]
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    for name in ("loss", "grad_norm"):
        assert [row[name] for row in rows] == pytest.approx(golden[name], rel=1e-6), name


def test_tensorboard_has_every_scalar(debug_run):
    output_dir, _ = debug_run
    scalars = _scalars(output_dir)
    for tag in (
        "loss",
        "loss/caption",
        "loss/interleaved",
        "loss/text",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "images_per_s",
        "mfu",
        "tflops_per_s_per_device",
    ):
        assert tag in scalars and len(scalars[tag]) > 0, f"missing scalar {tag}"
    assert all(0 < value < 1 for value in scalars["mfu"])
    assert max(scalars["images_per_s"]) > 0


def test_resolved_config_is_saved(debug_run):
    from mm1_megatron.config import load_config

    output_dir, _ = debug_run
    saved = yaml.safe_load((output_dir / "config.yaml").read_text())
    assert saved["training"]["train_steps"] == NUM_STEPS
    resolved = load_config(output_dir / "config.yaml")
    assert resolved.logging.output_dir == str(output_dir)
    assert (
        resolved.model.llm.num_layers
        == load_config(REPO / "configs/debug.yaml").model.llm.num_layers
    )


def test_progress_is_shown(debug_run):
    _, result = debug_run
    assert f"{NUM_STEPS}/{NUM_STEPS}" in result.stderr
    assert "eta" in result.stderr


def test_bad_config_fails_fast_with_the_field_named(tmp_path):
    result = train_in_process(
        f"logging.output_dir={tmp_path}", "parallel.sequence_parallel=true", "model.llm.num_layer=3"
    )
    assert result.returncode == 2
    assert "model.llm.num_layer" in result.log and "num_layers" in result.log
    assert not (tmp_path / "config.yaml").exists()


def test_stacked_configs_and_overrides_reach_the_run(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        "training:\n  train_steps: 2\n  global_batch_size: 4\nlogging:\n  log_interval: 1\n"
    )
    result = train_in_process(
        "--config",
        str(overlay),
        f"logging.output_dir={tmp_path / 'run'}",
        "training.micro_batch_size=2",
        "logging.tensorboard=false",
    )
    assert result.returncode == 0, result.log[-3000:]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["training"]["train_steps"] == 2 and saved["training"]["global_batch_size"] == 4
    assert saved["training"]["micro_batch_size"] == 2
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 2
    for row in rows:  # one data-parallel rank: nothing to balance
        assert row["vision_imbalance"] == 1.0
        assert row["data_wait_s"] >= 0 and 0 <= row["data_wait_fraction"] <= 1
    assert "vision max/mean 1.00 | data wait " in result.log
