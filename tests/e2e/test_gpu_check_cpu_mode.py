"""``tools/gpu_check.py``'s CPU mode runs its training steps end to end (tiny shapes), so
the GPU check cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import sys

import pytest

from tests.launch import run


def test_gpu_check_cpu_mode_runs_the_fp32_and_throughput_steps(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine run the real check (make gpu-check)")
    output = tmp_path / "figures.json"
    result = run(
        [
            sys.executable,
            "tools/gpu_check.py",
            "--allow-cpu",
            "--only",
            "fp32_vs_cpu,throughput",
            "--output",
            str(output),
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text())
    assert figures["fp32_vs_cpu"]["status"] == "ok"
    assert figures["fp32_vs_cpu"]["max_relative"] <= 1e-3
    throughput = figures["throughput"]
    assert throughput["status"] == "ok"
    for attention in ("per_document", "dense_mask_reference"):
        assert throughput[attention]["tokens_per_s"] > 0
        assert throughput[attention]["images_per_s"] > 0
    assert throughput["speedup_tokens_per_s"] > 0


def test_gpu_check_refuses_a_missing_wheels_folder(tmp_path):
    result = run(
        [sys.executable, "tools/gpu_check.py", "--allow-cpu", "--wheels", str(tmp_path / "no")]
    )
    assert result.returncode != 0 and "not a folder" in result.stderr
