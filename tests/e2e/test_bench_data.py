"""``tools/bench_data.py --tiny`` runs every part end to end (tiny sizes), so the benchmark,
the loader comparison above all, cannot rot."""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import run

LOADERS = ("ours", "energon", "webdataset")


@pytest.mark.slow
def test_bench_data_tiny_prints_every_part_as_json():
    result = run([sys.executable, "tools/bench_data.py", "--tiny"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["versions"]["megatron-energon"] != "not installed"
    assert all(rate > 0 for rate in summary["decode"]["images_per_s"].values())
    for packing in summary["packing"].values():
        assert packing["packed"] > packing["one_per_sequence"] > 0

    loaders = summary["loaders"]
    settings = loaders["settings"]
    per_measurement = settings["images_per_batch"] * settings["timed_batches"]
    assert sorted(loaders["workers"]) == ["0", "2"]
    for figures in loaders["workers"].values():
        assert sorted(figures["loaders"]) == sorted(LOADERS)
        for name in LOADERS:
            loader = figures["loaders"][name]
            # Every loader delivered the same images: all of them, in every measurement.
            assert loader["images_per_measurement"] == [per_measurement] * settings["rounds"]
            size = settings["image_size"]
            assert loader["image"] == [3, size, size, "float32"]
            for figure in ("images_per_s", "sequences_per_s", "startup_s"):
                spread = loader[figure]
                assert 0 < spread["min"] <= spread["median"] <= spread["max"]
                assert spread["n"] == settings["rounds"]
        for baseline in LOADERS[1:]:
            ratio = figures["ratios"][f"ours/{baseline}"]
            assert ratio["of_medians"] > 0 and ratio["per_round"]["min"] > 0
