"""What one process pays to import the trainer, with and without deferred compilation.

Every rank process and every command a test starts imports ``mm1_megatron.training.trainer``
first. ``import mm1_megatron`` arranges that megatron-core's fused functions are compiled on
first call (``mm1_megatron/compat/deferred_compile.py``); importing ``megatron.core.jit``
before ``mm1_megatron`` gives the eager baseline in the same interpreter. The two run
alternately, N times each, each in a fresh interpreter; the figures are wall and CPU
seconds (user + system of the child), median (min-max).

    python tools/bench_import.py --repeats 7 [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import sys; {prefix}import mm1_megatron.training.trainer; "
    "print(int('torch._inductor' in sys.modules), int('torch._dynamo' in sys.modules))"
)
VARIANTS = {
    "deferred (shipped)": "",
    "eager (megatron.core.jit first)": "import megatron.core.jit; ",
}


def one_import(prefix: str) -> dict:
    before = os.times()
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", PROBE.format(prefix=prefix)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    inductor, dynamo = (int(x) for x in result.stdout.split())
    return {"wall_s": wall, "cpu_s": cpu, "inductor": inductor, "dynamo": dynamo}


def describe(values) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    samples = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):  # alternate A/B so drift hits both alike
        for name, prefix in VARIANTS.items():
            samples[name].append(one_import(prefix))
    summary = {
        name: {
            "wall_s": describe([r["wall_s"] for r in runs]),
            "cpu_s": describe([r["cpu_s"] for r in runs]),
            "imports_inductor": bool(runs[-1]["inductor"]),
            "imports_dynamo": bool(runs[-1]["dynamo"]),
            "n": len(runs),
        }
        for name, runs in samples.items()
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    import megatron.core
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"megatron-core {megatron.core.__version__}")  # fmt: skip
    print(f"{'import mm1_megatron.training.trainer':36s} {'wall s, median (min-max)':26s} "
          f"{'CPU s':20s} inductor  dynamo  N")  # fmt: skip
    for name, row in summary.items():
        print(
            f"{name:36s} {row['wall_s']:26s} {row['cpu_s']:20s} "
            f"{str(row['imports_inductor']):9s} {str(row['imports_dynamo']):7s} {row['n']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
