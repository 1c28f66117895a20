"""The runs whose per-step loss and gradient norm are pinned in ``debug_30_steps.json``:
``configs/debug.yaml`` for 30 steps on CPU in fp32, single process, and a MoE variant
at EP=2 (launched as users launch them: ``mm1-train`` and torchrun; the test runs the
EP=2 one as ``mm1 train``'s ``main`` on the session's torchrun-started rank pool, which
gives the same numbers without starting three interpreters)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, List

from tests.launch import run_train

GOLDEN_FILE = Path(__file__).with_name("debug_30_steps.json")
NUM_STEPS = 30
MOE = ["model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2"]

# name -> (processes, overrides)
# TP=2 is not pinned separately: tests/parallel/test_layouts.py holds it (and every other
# layout) equal to the single-process run, which is pinned here.
RUNS: Dict[str, tuple] = {
    "single": (1, []),
    "moe_ep2": (2, [*MOE, "parallel.expert_parallel_size=2"]),
}


def run_config(name: str, *, on_pool: bool = False) -> List[dict]:
    """The run's metrics rows; ``on_pool``: a multi-process run on the test session's rank
    pool (``tests/rank_pool.py``) instead of a new torchrun."""
    processes, overrides = RUNS[name]
    train = run_train
    if on_pool and processes > 1:
        from tests.rank_pool import train_on_pool as train
    with tempfile.TemporaryDirectory(prefix=f"golden_{name}_") as output:
        result = train(
            f"training.train_steps={NUM_STEPS}",
            "training.precision=fp32",
            "logging.tensorboard=false",
            f"logging.output_dir={output}",
            *overrides,
            nproc=processes,
            timeout=900,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{name} run failed: {result.stderr[-3000:]}")
        lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
