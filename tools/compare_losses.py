"""Compare the per-step losses of two runs (their ``metrics.jsonl`` files).

    python tools/compare_losses.py runs/a/metrics.jsonl runs/b/metrics.jsonl \
        --steps 30 --rtol 1e-6

Prints one row per step (both losses and their relative difference) and exits 1 when a
difference exceeds ``--rtol`` or a step is missing from either run. Used to check that
megatron-core 0.16.1 and 0.19.x train identically (see docs/compatibility.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict


def read_losses(path: Path, key: str) -> Dict[int, float]:
    losses = {}
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"{path}:{line_number}: not JSON ({exc})") from None
        if key in record:
            losses[int(record["step"])] = float(record[key])
    return losses


def relative_difference(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--steps", type=int, default=30, help="compare steps 1..N")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--key", default="loss", help="metric to compare (default: loss)")
    args = parser.parse_args(argv)
    first, second = read_losses(args.first, args.key), read_losses(args.second, args.key)
    worst, failures = 0.0, 0
    print(f"{'step':>4}  {args.first.parent.name:>14}  {args.second.parent.name:>14}  rel. diff")
    for step in range(1, args.steps + 1):
        if step not in first or step not in second:
            print(f"{step:>4}  missing in {'first' if step not in first else 'second'} run")
            failures += 1
            continue
        diff = relative_difference(first[step], second[step])
        bad = not diff <= args.rtol or not math.isfinite(first[step])
        failures += bad
        worst = max(worst, diff)
        print(
            f"{step:>4}  {first[step]:14.8f}  {second[step]:14.8f}  {diff:.2e}"
            f"{'  > rtol' if bad else ''}"
        )
    print(f"max relative difference over {args.steps} steps: {worst:.2e} (rtol {args.rtol:g})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
