"""Balanced data placement changes where sequences are computed, not what a step learns.

Thirty steps at DP=2 (2 micro-batches of 2 sequences per rank) with ``data.balance`` on
and off consume the same global batches: the images per step are equal and the losses
agree within 1e-6 relative (the gradient is the same per-token sum, added in another
order). With balancing on, a new trainer resuming the step-25 checkpoint at DP=2 gives
bitwise the losses of the uninterrupted run, and a resume at DP=1 continues with the same
global batches (images per step equal) and losses within 1e-6 relative: a different
data-parallel size adds the same gradients in another order, so bitwise equality is not
possible there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.parallel.test_layouts import _run_worker

pytestmark = pytest.mark.slow

# The resumes run the last 5 steps: enough for bitwise equality (and the same global
# batches) after the checkpoint, where 15 cost three times as much.
STEPS, SAVE_AT = 30, 25
MICRO = ["training.micro_batch_size=2", "training.seq_length=128"]
REL_TOL = 1e-6


def _load(out_dir: Path, name: str) -> list:
    return json.loads((out_dir / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("balanced")
    save = out / "ckpt"
    _run_worker(
        2,
        {
            "balanced": MICRO
            + [f"checkpoint.save_dir={save}", f"checkpoint.save_interval={SAVE_AT}"],
            "unbalanced": MICRO + ["data.balance.enabled=false"],
        },
        out,
        steps=STEPS,
    )
    resume = [f"checkpoint.load_dir={save / f'step_{SAVE_AT:08d}'}"]
    # New trainers in the same processes (tests/checkpoint/test_resume_and_reshard.py
    # resumes in new processes).
    _run_worker(2, {"balanced_resumed": MICRO + resume}, out, steps=STEPS)
    _run_worker(1, {"balanced_resumed_dp1": MICRO + resume}, out, steps=STEPS)
    return out


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def test_balancing_on_and_off_give_the_same_losses(runs):
    balanced, unbalanced = _load(runs, "balanced"), _load(runs, "unbalanced")
    assert len(balanced) == len(unbalanced) == STEPS
    assert [s["num_images"] for s in balanced] == [s["num_images"] for s in unbalanced]
    worst = max(_relative(b["loss"], u["loss"]) for b, u in zip(balanced, unbalanced))
    assert worst <= REL_TOL, worst
    # Not vacuous: balancing did move sequences (the losses are not bitwise equal).
    assert any(b["loss"] != u["loss"] for b, u in zip(balanced, unbalanced))


def test_balanced_resume_is_bitwise_exact(runs):
    full, resumed = _load(runs, "balanced"), _load(runs, "balanced_resumed")
    assert len(resumed) == STEPS - SAVE_AT
    for offset, (expected, got) in enumerate(zip(full[SAVE_AT:], resumed)):
        step = SAVE_AT + 1 + offset
        assert got["loss"] == expected["loss"], f"step {step}"
        assert got["grad_norm"] == expected["grad_norm"], f"step {step}"


def test_resume_at_another_dp_size_continues_the_same_global_batches(runs):
    full, resumed = _load(runs, "balanced"), _load(runs, "balanced_resumed_dp1")
    assert len(resumed) == STEPS - SAVE_AT
    assert [s["num_images"] for s in resumed] == [s["num_images"] for s in full[SAVE_AT:]]
    worst = max(_relative(got["loss"], exp["loss"]) for got, exp in zip(resumed, full[SAVE_AT:]))
    assert worst <= REL_TOL, worst
