"""``mm1 estimate --images-distribution``: a measured histogram of images per sequence
drives FLOPs, step time and MFU through its mean while memory stays at the image cap, and
the vision stage's decoder-layer count it recommends is the best of a brute-force search
over every count (``vision_stage.py``, simulated with ``pipeline_schedule.simulate_1f1b``).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from mm1_megatron.config import load_config, validate_config
from mm1_megatron.scaling.estimate.cli import main
from mm1_megatron.scaling.estimate.estimator import DEFAULT_EFFICIENCY, estimate_config
from mm1_megatron.scaling.estimate.hardware import gpu_type
from mm1_megatron.scaling.estimate.image_counts import image_counts_from, load_image_counts
from mm1_megatron.scaling.estimate.pipeline_schedule import simulate_1f1b
from mm1_megatron.scaling.estimate.stages import pipeline_stages
from mm1_megatron.scaling.estimate.step_time import stage_time
from mm1_megatron.scaling.estimate.vision_stage import recommend_vision_stage
from mm1_megatron.scaling.estimate.workload import default_workload
from tests.conftest import CONFIG_DIR

MM1_30B = str(CONFIG_DIR / "mm1_30b.yaml")
# Mean 4 (integral, to compare with --images-per-sequence 4), p50 2, p90 10, max 10.
SMALL = {"images_per_sequence": {"2": 3, "10": 1}}
# Bimodal: interleaved documents with few images, caption-packed sequences near the cap.
BIMODAL = {"0": 14, "1": 12, "2": 13, "3": 10, "4": 6, "12": 2, "13": 4, "14": 8, "15": 12}


def _json(capsys, *argv: str) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """The 30B config on its own 16 GPUs: at the cap, at 4 images, with ``SMALL``."""
    import contextlib
    import io

    path = tmp_path_factory.mktemp("images") / "balance.json"
    path.write_text(json.dumps(SMALL))
    out = {}
    for name, extra in (
        ("cap", []),
        ("four", ["--images-per-sequence", "4"]),
        ("measured", ["--images-distribution", str(path)]),
    ):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            assert main(["--config", MM1_30B, "--json", *extra]) == 0
        out[name] = json.loads(buffer.getvalue())
    return out


def test_the_mean_drives_flops_step_time_and_mfu(reports):
    measured, four = reports["measured"], reports["four"]
    assert measured["images_distribution"]["mean"] == 4.0
    assert measured["workload"]["images_per_sequence"] == 4.0
    assert measured["flops_per_sequence"] == four["flops_per_sequence"]
    assert measured["flops_per_step"] == four["flops_per_step"]
    assert measured["flops_per_step"] < reports["cap"]["flops_per_step"]
    step, expected = measured["config_layout"]["step"], four["config_layout"]["step"]
    assert step["step_seconds"] == pytest.approx(expected["step_seconds"], rel=1e-12)
    assert measured["config_layout"]["mfu"] == pytest.approx(four["config_layout"]["mfu"])


def test_memory_stays_at_the_cap(reports):
    measured, cap = reports["measured"]["config_layout"], reports["cap"]["config_layout"]
    assert reports["measured"]["workload"]["memory_images_per_sequence"] == 16
    assert measured["peak_memory_bytes"] == cap["peak_memory_bytes"]
    assert measured["memory_stages"] == cap["memory_stages"]
    four = reports["four"]["config_layout"]
    assert four["peak_memory_bytes"] < cap["peak_memory_bytes"]  # --images-per-sequence


def test_the_report_carries_the_distribution_and_the_advice(reports):
    measured = reports["measured"]
    summary = {k: measured["images_distribution"][k] for k in ("mean", "p50", "p90", "max")}
    assert summary == {"mean": 4.0, "p50": 2, "p90": 10, "max": 10}
    advice = measured["vision_stage"]
    assert advice["images_from"] == "distribution"
    images = advice["micro_batch_images_per_sequence"]
    assert len(images) == advice["num_microbatches"] == 512  # 512 sequences, DP 1
    assert sorted(set(images)) == [2.0, 10.0] and np.mean(images) == 4.0
    assert advice["configured"]["vision_stage_layers"] == 12
    best, configured = advice["best"], advice["configured"]
    assert best["fits"] and not configured["fits"]  # DP 1: 75 GiB at the cap on 16 GPUs
    assert best["step_seconds"] > configured["step_seconds"]  # the fastest that fits
    # Without a distribution, every micro-batch is at the cap.
    constant = reports["cap"]["vision_stage"]
    assert constant["images_from"] == "workload"
    assert set(constant["micro_batch_images_per_sequence"]) == {16.0}


def _brute_force(overrides, counts, num_gpus=64, last_takes_rest=False):
    """Every vision-stage count the config validation accepts (each stage at least one
    layer), each micro-batch and stage through ``stage_time``: {count: (step, fits)}."""
    base = validate_config(load_config(MM1_30B, overrides))
    gpu, layers = gpu_type("h100"), base.model.llm.num_layers
    workload, cap = default_workload(base, counts.mean), default_workload(base)
    passes = 3 if base.parallel.recompute == "full" else 2
    found = {}
    for first in range(1, layers):
        split = [f"parallel.num_decoder_layers_on_vision_stage={first}"]
        if last_takes_rest:
            split.append(f"parallel.num_decoder_layers_on_last_stage={layers - first}")
        try:
            cfg = validate_config(load_config(MM1_30B, [*overrides, *split]))
        except ValueError:
            continue
        e = estimate_config(cfg, num_gpus=num_gpus, gpu=gpu, workload=workload, memory_workload=cap)
        m, micro = e.step.num_microbatches, cfg.training.micro_batch_size
        stages = pipeline_stages(cfg, m)
        if any(not s.decoder_layers for s in stages):
            continue
        totals = counts.draw(m, micro)
        forward, backward = np.empty((len(stages), m)), np.empty((len(stages), m))
        for s, stage in enumerate(stages):
            for k in range(m):
                w = dataclasses.replace(workload, images_per_sequence=totals[k] / micro)
                t = stage_time(
                    cfg, w, stage, gpu=gpu, efficiency=DEFAULT_EFFICIENCY, dp=e.layout.dp
                )
                forward[s, k] = t.forward + t.tensor_parallel / passes + t.expert_parallel / 2
                backward[s, k] = t.total - t.pipeline_send - forward[s, k]
        send = e.step.stages[0].pipeline_send / 2
        pipeline = simulate_1f1b(forward, backward, send)
        found[first] = (pipeline + e.step.data_parallel_exposed + e.step.optimizer, e.fits)
    return found


@pytest.mark.parametrize(
    "overrides, last_takes_rest",
    [
        ([], False),  # PP 4: the last stage keeps 14, the middle two share the rest
        (
            [
                "parallel.pipeline_parallel_size=2",
                "parallel.num_decoder_layers_on_vision_stage=28",
                "parallel.num_decoder_layers_on_last_stage=28",
            ],
            True,
        ),
    ],
    ids=["pp4", "pp2"],
)
def test_the_recommendation_is_the_best_of_every_count(overrides, last_takes_rest):
    counts = image_counts_from(BIMODAL)
    cfg = validate_config(load_config(MM1_30B, overrides))
    advice = recommend_vision_stage(
        cfg,
        num_gpus=64,
        gpu=gpu_type("h100"),
        workload=default_workload(cfg, counts.mean),
        memory_workload=default_workload(cfg),
        images=counts,
        efficiency=DEFAULT_EFFICIENCY,
        memory_margin=0.1,
    )
    found = _brute_force(overrides, counts, last_takes_rest=last_takes_rest)
    assert [c.vision_stage_layers for c in advice.candidates] == sorted(found)
    for c in advice.candidates:
        assert c.step_seconds == pytest.approx(found[c.vision_stage_layers][0], rel=1e-9)
    fitting = {first: step for first, (step, fits) in found.items() if fits}
    best = min(fitting, key=fitting.get)
    assert advice.best.vision_stage_layers == best
    assert advice.best.step_seconds == pytest.approx(fitting[best], rel=1e-9)
    configured = cfg.parallel.num_decoder_layers_on_vision_stage
    assert advice.configured.step_seconds == pytest.approx(found[configured][0], rel=1e-9)


def test_no_advice_with_one_stage():
    cfg = validate_config(load_config(str(CONFIG_DIR / "mm1_7b.yaml")))
    w = default_workload(cfg)
    kw = dict(gpu=gpu_type("h100"), workload=w, efficiency=0.6, memory_margin=0.1)
    assert recommend_vision_stage(cfg, num_gpus=8, **kw) is None


def test_cli_prints_the_distribution_and_the_recommendation(tmp_path, capsys):
    path = tmp_path / "histogram.json"
    path.write_text(json.dumps(SMALL["images_per_sequence"]))  # the bare object works too
    assert main(["--config", MM1_30B, "--images-distribution", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Workload: 4096 tokens, 4.00 images per sequence" in out
    assert "mean 4.00, p50 2, p90 10, max 10 images per sequence over 4 sequences" in out
    assert "memory at the cap 16" in out
    assert "Vision-stage decoder layers (parallel.num_decoder_layers_on_vision_stage)" in out
    assert "  configured  12 layers (stages 12/15/15/14)" in out
    assert "\n  best " in out

    with pytest.raises(SystemExit) as exit_info:  # one or the other
        main(["--config", MM1_30B, "--images-distribution", str(path), "--images-per-sequence=4"])
    assert exit_info.value.code == 2
    path.write_text('{"images_per_sequence": {"two": 3}}')
    assert main(["--config", MM1_30B, "--images-distribution", str(path)]) == 2
    assert main(["--config", MM1_30B, "--images-distribution", str(tmp_path / "none")]) == 2


def test_quantiles_draws_and_file_formats(tmp_path):
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.choice(17, size=int(rng.integers(1, 8)), replace=False)
        seen = rng.integers(1, 50, size=len(counts))
        dist = image_counts_from({str(c): int(n) for c, n in zip(counts, seen)})
        values = np.repeat(counts, seen)
        assert dist.mean == pytest.approx(values.mean())
        for u in (0.1, 0.5, 0.9, 1.0):
            assert dist.quantile(u) == np.quantile(values, u, method="inverted_cdf")
        draws = dist.draw(64)
        for c, n in zip(dist.counts, dist.sequences):  # each count in its share, +-1
            assert abs(draws.count(c) - 64 * n / dist.total) <= 1
    dist = image_counts_from(BIMODAL)
    pairs = dist.draw(400, micro=2)
    assert np.mean(pairs) == pytest.approx(2 * dist.mean, rel=0.01)
    assert max(pairs) <= 2 * dist.max
    first_half = dist.draw(128)[:64]  # interleaved: any stretch spans the distribution
    assert np.mean(first_half) == pytest.approx(dist.mean, rel=0.1)
    for text in (json.dumps({"images_per_sequence": BIMODAL}), json.dumps(BIMODAL)):
        (tmp_path / "d.json").write_text(text)
        assert load_image_counts(tmp_path / "d.json") == dist
    for bad in ("[1, 2]", "{}", '{"1": -1}', '{"1": 0}', '{"-1": 4}', '{"1": 1.5}'):
        (tmp_path / "d.json").write_text(bad)
        with pytest.raises(ValueError):
            load_image_counts(tmp_path / "d.json")
