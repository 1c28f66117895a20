"""``tools/bench_step.py --against transformers`` runs end to end (debug model, one step);
its ``main`` in this process (``tests.in_process.run_script``), without a child's
interpreter and imports."""

from __future__ import annotations

import json

import pytest

from tests.in_process import REPO, run_script


@pytest.mark.slow
def test_bench_step_against_transformers_prints_both_loops_as_json():
    result = run_script(
        REPO / "tools" / "bench_step.py",
        [
            "--against",
            "transformers",
            "--steps",
            "2",
            "--warmup",
            "0",
            "training.micro_batch_size=2",
            "training.global_batch_size=4",
            "training.seq_length=64",
        ],
    )
    assert result.returncode == 0, result.log[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for loop in ("ours", "plain"):
        figures = summary[loop]
        assert figures["n"] == 2
        assert 0 < figures["min"] <= figures["median"] <= figures["max"]
    assert summary["ratio"] > 0 and summary["per_step_ratio"]["n"] == 2
