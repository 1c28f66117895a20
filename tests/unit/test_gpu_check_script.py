"""``tools/gpu_check.py`` runs (here without a GPU) and writes its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_its_cpu_capable_step(tmp_path):
    pytest.importorskip("nvidia.dali")
    output = tmp_path / "figures.json"
    result = subprocess.run(
        [
            sys.executable,
            "tools/gpu_check.py",
            "--allow-cpu",
            "--only",
            "dali_vs_pil",
            "--output",
            str(output),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(output.read_text())
    for mode in ("squash", "crop", "pad"):
        assert figures["dali_vs_pil"][mode]["max_8bit_steps"] <= 3
    assert "startup" not in figures


def test_gpu_check_refuses_to_pretend_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--output", str(tmp_path / "x.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "no GPU visible" in result.stderr
