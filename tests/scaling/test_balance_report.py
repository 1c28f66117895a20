"""``mm1 balance``: its per-rank figures equal what the loaders actually deliver.

The report places each global batch from planned costs; the reference builds the real
micro-batches with the loader of every data-parallel rank (unbalanced, and balanced with
ranks simulated by threads) and counts their images. Their vision imbalance per step must
be the report's, placement for placement.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mm1_megatron.config import load_config
from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.pipeline.balance import imbalance
from mm1_megatron.data.pipeline.loader import Balancing, MicroBatchLoader
from mm1_megatron.scaling.balance.cli import main
from mm1_megatron.training.flops import balance_weights
from tests.unit.test_balance import _run, _ThreadAllGather

CONFIG = "configs/debug.yaml"
OVERRIDES = ["training.micro_batch_size=2"]  # 2 micro-batches of 2 per rank at DP=2
STEPS, DP = 3, 2


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("balance") / "balance.json"
    argv = ["--config", CONFIG, "--dp", str(DP), "--steps", str(STEPS), "--output", str(out)]
    assert main([*argv, *OVERRIDES]) == 0
    return json.loads(out.read_text())


def _rank_images(balanced: bool) -> np.ndarray:
    """``[step, rank]`` images the loaders deliver."""
    cfg = load_config(CONFIG, OVERRIDES)
    loader, tokenizer = build_run_data(cfg)
    num_micro = cfg.training.global_batch_size // (cfg.training.micro_batch_size * DP)
    gather = _ThreadAllGather(DP)
    loaders = [
        MicroBatchLoader(
            loader.builder,
            tokenizer=tokenizer,
            micro_batch_size=cfg.training.micro_batch_size,
            seed=cfg.training.seed,
            dp_rank=rank,
            dp_size=DP,
            balancing=Balancing(num_micro, balance_weights(cfg.model), gather.for_rank(rank))
            if balanced
            else None,
        )
        for rank in range(DP)
    ]
    batches = _run(loaders, STEPS * num_micro)
    images = np.array([[int(b["num_images"].sum()) for b in rank] for rank in batches])
    return images.reshape(DP, STEPS, num_micro).sum(axis=2).T


@pytest.mark.parametrize("placement", ["natural", "balanced"])
def test_report_matches_the_loaders(report, placement):
    images = _rank_images(balanced=placement == "balanced")
    expected = [imbalance(step) for step in images]  # fixed size: vision FLOPs ∝ images
    got = report["placements"][placement]["per_step"]["rank_vision"]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_report_contents(report):
    histogram = report["images_per_sequence"]
    assert sum(histogram.values()) == STEPS * report["global_batch_size"]
    natural, balanced = (report["placements"][p] for p in ("natural", "balanced"))
    assert balanced["rank_varying"]["max"] <= natural["rank_varying"]["max"]
    for figures in (natural, balanced):
        assert len(figures["per_step"]["step_seconds"]) == STEPS
        assert all(s > 0 for s in figures["per_step"]["step_seconds"])


def test_estimate_reads_the_report(report, tmp_path, capsys):
    from mm1_megatron.scaling.estimate.cli import main as estimate

    path = tmp_path / "counts.json"
    path.write_text(json.dumps(report))
    assert estimate(["--config", CONFIG, "--images-distribution", str(path)]) == 0
    assert "Images per sequence measured" in capsys.readouterr().out


def test_bad_dp_is_refused(caplog):
    assert main(["--config", CONFIG, "--dp", "3", "--steps", "1"]) == 2
    assert "not a multiple of" in caplog.text
