"""``tools/bench_balance.py`` in its smallest settings, on the synthetic world and on a
tiny corpus of shards built with ``mm1 data``, so the benchmark cannot rot."""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import run

pytestmark = pytest.mark.slow  # about 10 s: two runs of the tool, one builds a corpus

SMALLEST = ["--config", "configs/debug.yaml", "--dp", "2", "--steps", "2"]
TINY_CORPUS = ["--jpegs", "2", "--caption-pairs", "8", "--documents", "2", "--text-documents", "4"]


def _figures(*arguments: str) -> dict:
    result = run([sys.executable, "tools/bench_balance.py", *arguments], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    (figures,) = summary["figures"]
    assert figures["dp"] == 2 and figures["sequences_per_rank"] == 4
    for name in ("load_s", "plan_s", "plan_costs_s", "plan_assign_s"):
        spread = figures[name]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"], name
        assert spread["n"] == 2
    assert figures["plan_over_load"] > 0
    assert 0 < figures["costs_share_of_plan"] < 1
    return summary


def test_bench_balance_synthetic_prints_json_figures():
    assert _figures(*SMALLEST)["source"] == "synthetic"


def test_bench_balance_on_shards_prints_json_figures(tmp_path):
    summary = _figures("--shards", "--workdir", str(tmp_path), *SMALLEST, *TINY_CORPUS)
    assert summary["source"] == "webdataset"
    corpus = summary["corpus"]["description"]
    assert corpus["caption_pairs"] == 8 and corpus["documents"] == 2
    assert corpus["text_tokens"] > 0 and corpus["tokenizer_vocab_size"] > 5
    assert summary["figures"][0]["images_per_step"]["max"] > 0
    assert (tmp_path / "corpus.json").exists()
