"""``tools/gpu_check.py``'s CPU mode runs its training steps end to end (tiny shapes), so
the GPU check cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from tests.in_process import load_script
from tests.launch import REPO, run


def test_gpu_check_cpu_mode_runs_the_throughput_step(tmp_path, caplog):
    """The throughput step (two training launches through the same ``_train`` the other
    steps use). ``fp32_vs_cpu`` compares a GPU run with a CPU run: on a CPU-only machine
    both are CPU runs, so running it here would prove nothing but two more launches. The
    check's ``main`` runs in this process (its steps start their training runs in children
    either way; a child of its own would only add the interpreter's start-up)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine run the real check (make gpu-check)")
    caplog.set_level(logging.INFO)
    output = tmp_path / "figures.json"
    argv = ["--allow-cpu", "--only", "throughput", "--output", str(output)]
    code = load_script(REPO / "tools" / "gpu_check.py").main(argv)
    assert code == 0, caplog.text[-3000:]
    figures = json.loads(output.read_text())
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
