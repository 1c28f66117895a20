"""Pinned numbers: the per-step loss and gradient norm of 30 debug steps (single process
and MoE at EP=2) equal ``tests/golden/debug_30_steps.json``. The parallel tests compare
layouts with each other; this catches a change that moves them all together. Regenerate
only on purpose: ``python -m tests.golden.regenerate``.

Tolerance: the numbers were bit-identical between megatron-core 0.16.1 (Python 3.11,
torch CPU build) and 0.19.2 (Python 3.12, torch CUDA build on the CPU); 1e-6 relative
leaves room only for another CPU's kernels."""

from __future__ import annotations

import json

import pytest

from tests.golden.runs import GOLDEN_FILE, RUNS, run_config


# "single" is checked on tests/e2e/test_train_debug.py's run of the same command.
@pytest.mark.parametrize("name", sorted(set(RUNS) - {"single"}))
def test_debug_run_matches_the_golden_values(name):
    golden = json.loads(GOLDEN_FILE.read_text())["runs"][name]
    rows = run_config(name, on_pool=True)
    assert len(rows) == len(golden["loss"]) == 30
    for metric in ("loss", "grad_norm"):
        measured = [row[metric] for row in rows]
        assert measured == pytest.approx(golden[metric], rel=1e-6), metric
