"""Resume is exact and checkpoints reshard across layouts.

Exactness: a run of 2N steps that saves at step N, and a *new process* that resumes from
that checkpoint and runs steps N+1..2N, give bitwise identical losses and gradient norms
(fp32 on CPU: same weights, optimizer state, schedule and data position, same ops).

Resharding: checkpoints saved at TP=2, at PP=2 (the vision stage), at MoE EP=2 and at
CP=2 load into a single process; the next step's loss matches the original layout's next step
within 1e-5 relative (the layouts differ only in summation order, as in test_layouts.py).
(A TP=2 checkpoint also loads at PP=2 in mm1-eval's parity test with transformers.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.parallel.test_layouts import CP2, MOE, OVERLAP, PP2, SHORT_SEQUENCES, TP2, _run_worker

N = 2

# Every run here packs 128-token sequences (test_layouts.py's SHORT_SEQUENCES): what a
# checkpoint holds and how it loads do not depend on the length.
RESUME_LAYOUTS = {
    "tp2": SHORT_SEQUENCES + TP2,
    "pp2_vision_stage": SHORT_SEQUENCES + PP2,
    "moe_ep2": SHORT_SEQUENCES + MOE + ["parallel.expert_parallel_size=2"],
    # The distributed optimizer with both overlaps on: resume stays bitwise exact (it
    # restores the weights from the optimizer's fp32 shards, so it cannot tell whether
    # the save gathered them first). Without the overlaps the load is the same code; the
    # saved weights equal a non-overlapped run's (test_overlap_param_gather_save.py).
    "dp2_distopt_overlapped": SHORT_SEQUENCES + ["training.micro_batch_size=2"] + OVERLAP,
    # Context parallelism: the distributed optimizer shards its state over DP x CP.
    "cp2": SHORT_SEQUENCES + CP2,
}


def _load(out_dir: Path, name: str) -> list:
    return json.loads((out_dir / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume")
    save = {name: out / "ckpt" / name for name in RESUME_LAYOUTS}
    full = {
        f"{name}_full": overrides
        + [f"checkpoint.save_dir={save[name]}", f"checkpoint.save_interval={N}"]
        for name, overrides in RESUME_LAYOUTS.items()
    }
    _run_worker(2, full, out, steps=2 * N)
    resumed = {
        f"{name}_resumed": overrides + [f"checkpoint.load_dir={save[name] / f'step_{N:08d}'}"]
        for name, overrides in RESUME_LAYOUTS.items()
    }
    _run_worker(2, resumed, out, steps=2 * N, fresh_processes=True)  # new processes
    # Resharding the step-N checkpoints of the full runs: TP=2, PP=2 (vision stage), MoE
    # EP=2 and CP=2, each into a single process.
    _run_worker(
        1,
        {
            f"{name}_to_single": overrides
            + [
                f"checkpoint.load_dir={save[name] / f'step_{N:08d}'}",
                "optimizer.schedule_on_resume=checkpoint",  # one step of the 2N-step run
            ]
            for name, overrides in (
                ("tp2", SHORT_SEQUENCES),
                ("pp2_vision_stage", SHORT_SEQUENCES),
                ("moe_ep2", SHORT_SEQUENCES + MOE),
                ("cp2", SHORT_SEQUENCES),
            )
        },
        out,
        steps=N + 1,
    )
    return out


@pytest.mark.parametrize("layout", sorted(RESUME_LAYOUTS))
def test_resume_is_bitwise_exact(runs, layout):
    full = _load(runs, f"{layout}_full")
    resumed = _load(runs, f"{layout}_resumed")
    assert len(full) == 2 * N and len(resumed) == N
    for offset, (expected, got) in enumerate(zip(full[N:], resumed)):
        step = N + 1 + offset
        assert got["loss"] == expected["loss"], f"step {step}"
        assert got["grad_norm"] == expected["grad_norm"], f"step {step}"


@pytest.mark.parametrize("layout", ["tp2", "pp2_vision_stage", "moe_ep2", "cp2"])
def test_checkpoint_reshards_to_a_single_process(runs, layout):
    source, target = f"{layout}_full", f"{layout}_to_single"
    original = _load(runs, source)
    resharded = _load(runs, target)
    assert len(resharded) == 1
    assert resharded[0]["loss"] == pytest.approx(original[N]["loss"], rel=1e-5)
    assert resharded[0]["grad_norm"] == pytest.approx(original[N]["grad_norm"], rel=1e-5)
