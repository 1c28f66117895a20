"""``tools/bench_post_training.py`` in its smallest settings (two variants, one round of
three steps, from the session's reference checkpoint), so the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

from tests.launch import REPO, run

SMALLEST = ["--steps", "3", "--warmup", "1", "--repeats", "1", "--variants", "sft", "dpo_lora"]


def _bench_module():
    spec = importlib.util.spec_from_file_location(
        "bench_post_training", REPO / "tools" / "bench_post_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_post_training_prints_json_figures(reference, capsys):
    base = reference / "ckpt" / "step_00000006"
    command = [sys.executable, "tools/bench_post_training.py", *SMALLEST, "--json"]
    result = run([*command, "--base", str(base)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["base"] == str(base) and not summary["base_built"]
    variants = summary["variants"]
    assert list(variants) == ["sft", "dpo_lora"]
    for name, figures in variants.items():
        for key in ("step_time_s", "peak_rss_mb"):
            spread = figures[key]
            assert math.isfinite(spread["median"]), (name, key)
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], (name, key)
        assert figures["step_time_s"]["n"] == 2  # 3 steps, 1 dropped
        assert figures["peak_rss_mb"]["n"] == 1
        assert figures["text_tokens_per_step"] > 0 and figures["images_per_step"] > 0
    assert variants["sft"]["step_time_s_over_sft"] == 1.0
    assert variants["dpo_lora"]["peak_rss_mb_over_sft"] > 0
    # LoRA trains the adapters only (debug_dpo.yaml trains no part in full).
    trainable = {name: figures["trainable_parameters"] for name, figures in variants.items()}
    assert 0 < trainable["dpo_lora"] < trainable["sft"]

    # The table the command prints without --json, from the same figures.
    _bench_module().print_table(variants, "header")
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "header" and len(table) == 4
    assert table[2].startswith("sft ") and "1.00x" in table[2]
    assert table[3].startswith("dpo_lora ")
