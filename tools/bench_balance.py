#!/usr/bin/env python
"""What balanced placement costs the data loader, per step, against the loader's own work.

For one data-parallel rank of ``--dp`` (simulated in this process), step by step:

- ``load``: what the rank's loader does without balancing, build its ``G / D`` sequences
  (``builder.sequence``: draw or decode, pack, normalise) and collate its micro-batches;
- ``plan``: what balancing adds on the rank: the costs of those same sequences
  (``builder.sequence_cost``, no pixels) and the assignment of the whole global batch
  (``balance.assign_global_batch``). The all-gather of the other ranks' cost rows is not
  timed (simulated ranks; it moves ``G x 4`` int64, 16 KiB for MM1's 512 sequences).

The two alternate step by step, so machine noise hits both alike. Printed: median, min
and max seconds of each over ``--steps`` steps, and ``plan / load`` of the medians, for each
``--dp``. One torch thread (as in a loader worker).

    python tools/bench_balance.py                          # mm1_30b, DP 4, 8 and 64
    python tools/bench_balance.py --config configs/debug.yaml --dp 2 --steps 3   # smoke

The last line printed is one JSON object of all the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm1_megatron.config import load_config  # noqa: E402
from mm1_megatron.data.build import build_run_data  # noqa: E402
from mm1_megatron.data.pipeline.balance import assign_global_batch  # noqa: E402
from mm1_megatron.data.pipeline.loader import collate  # noqa: E402
from mm1_megatron.data.pipeline.tiling import tile_size  # noqa: E402
from mm1_megatron.training.flops import balance_weights  # noqa: E402


def _stats(values: List[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def measure(cfg, dp: int, steps: int, rank: int = 0) -> Dict[str, object]:
    builder = build_run_data(cfg)[0].builder
    t = cfg.training
    per_rank, b = t.global_batch_size // dp, t.micro_batch_size
    weights = balance_weights(cfg.model, tile_size(cfg.data.tiling))
    load, plan = [], []
    for step in range(steps):
        first = step * t.global_batch_size
        own = [first + n * dp + rank for n in range(per_rank)]
        # The other ranks' rows, as the all-gather would deliver them (not timed).
        others = np.array(
            [builder.sequence_cost(first + i).as_row() for i in range(t.global_batch_size)]
        )
        started = time.perf_counter()
        mine = np.array([builder.sequence_cost(g).as_row() for g in own])
        rows = others.copy()
        rows[rank::dp] = mine
        assign_global_batch(weights.total(rows), dp_size=dp, micro_batch_size=b)
        plan.append(time.perf_counter() - started)
        started = time.perf_counter()
        for k in range(0, per_rank, b):
            collate([builder.sequence(g)[0] for g in own[k : k + b]])
        load.append(time.perf_counter() - started)
    return {
        "dp": dp,
        "sequences_per_rank": per_rank,
        "load_s": _stats(load),
        "plan_s": _stats(plan),
        "plan_over_load": statistics.median(plan) / statistics.median(load),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/mm1_30b.yaml"))
    parser.add_argument("--dp", type=int, nargs="+", default=[4, 8, 64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    figures = []
    for dp in args.dp:
        result = measure(cfg, dp, args.steps)
        figures.append(result)
        load, plan = result["load_s"], result["plan_s"]
        print(
            f"DP={dp:>3} ({result['sequences_per_rank']} sequences per rank): load "
            f"{load['median']:.4f} s [{load['min']:.4f}, {load['max']:.4f}], plan "
            f"{plan['median']:.4f} s [{plan['min']:.4f}, {plan['max']:.4f}], N={load['n']}; "
            f"plan / load {result['plan_over_load']:.2%}"
        )
    print(
        json.dumps(
            {
                "config": args.config,
                "overrides": args.overrides,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                "figures": figures,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
