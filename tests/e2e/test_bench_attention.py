"""``tools/bench_attention.py`` runs end to end (tiny shapes), so the benchmark cannot rot."""

from __future__ import annotations

import json
import sys

from tests.launch import run


def test_bench_attention_prints_every_ratio_as_json():
    result = run([sys.executable, "tools/bench_attention.py", "--tiny", "--repeats", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for kind in ("core_attention", "decoder_layer"):
        for packing in ("16_documents", "1_document"):
            assert summary["ratios"][f"{kind}/{packing}/memory_ratio"] >= 0
            for path in ("reference", "new"):
                assert summary["results"][f"{kind}/{packing}/{path}"]["peak_mib"] >= 0
    assert summary["ratios"]["core_attention/16_documents/speedup"] > 0
    for documents in ("1_documents", "8_documents"):
        row = summary["speed_against_slicing"][documents]
        assert row["gradients_bitwise_equal"] is True
        for name in ("sliced_before", "per_document"):
            for part in ("forward", "backward"):
                spread = row[name][part]
                assert 0 < spread["min"] <= spread["median"] <= spread["max"]
                assert spread["n"] == 1
        assert row["total_speedup"] > 0
