"""``tools/bench_generate.py`` runs end to end (tiny model), so the benchmark cannot rot.
Its ``main`` runs in this process (``tests.in_process.run_script``): the same code from
argument parsing to the printed JSON, without a child's interpreter and imports."""

from __future__ import annotations

import json

from tests.in_process import REPO, run_script

BENCH = REPO / "tools" / "bench_generate.py"


def test_bench_generate_prints_matching_tokens_and_timings_as_json():
    result = run_script(BENCH, ["--tiny"])
    assert result.returncode == 0, result.log[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("prompt_tokens", "new_tokens", "images", "repeats", "torch_threads"):
        assert summary[key] >= 1
    assert summary["all_tokens_match"] is True
    figures = summary["results"]["tiny"]
    assert figures["tokens_match"] is True and figures["first_mismatch"] is None
    # No stop token: both methods generate exactly the requested number of tokens.
    new = summary["new_tokens"]
    assert figures["generated_tokens"] == {"cached": new, "recompute": new}
    for method in ("cached", "recompute"):
        assert figures[method]["seconds"] > 0
        assert figures[method]["tokens_per_s"] > 0
        assert len(figures[method]["samples"]) == summary["repeats"]
    assert figures["cached"]["prefill_seconds"] > 0
    assert "decode_ms_per_token" in figures["cached"]
    assert figures["speedup"] > 0


def test_bench_against_transformers_generates_the_same_tokens_at_batch_1_and_8():
    result = run_script(BENCH, ["--against", "transformers", "--tiny"])
    assert result.returncode == 0, result.log[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["against"] == "transformers" and summary["all_tokens_identical"] is True
    assert set(summary["versions"]) == {"torch", "megatron_core", "transformers"}
    batches = summary["results"]["tiny"]
    assert sorted(batches, key=int) == ["1", "8"]
    for batch, figures in batches.items():
        assert figures["tokens_identical"] is True
        new = summary["new_tokens"]
        assert figures["generated_per_prompt"] == {"ours": [new], "transformers": [new]}
        for side in ("ours", "transformers"):
            side_figures = figures[side]
            assert side_figures["n"] == summary["repeats"] == len(side_figures["samples"])
            assert side_figures["tokens"] == int(batch) * new
            assert 0 < side_figures["min_s"] <= side_figures["median_s"] <= side_figures["max_s"]
        assert figures["ratio"] > 0
