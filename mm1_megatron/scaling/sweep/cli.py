"""``mm1 sweep``: expand a sweep YAML into runs, run the local ones, show their status.

    mm1 sweep expand examples/scaling/sweep.yaml --output runs/scaling   # configs + launches
    mm1 sweep expand examples/scaling/sweep.yaml --dry-run               # the table only
    mm1 sweep run runs/scaling                                           # local runs, in turn
    mm1 sweep run runs/scaling --only llm_h32_l2 --only llm_h64_l2       # some of them
    mm1 sweep status runs/scaling
    mm1 report --sweep runs/scaling --output runs/scaling/report

See ``mm1_megatron/scaling/sweep/spec.py`` for the spec and docs/scaling.md for a walk-through.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from mm1_megatron.cli.flags import add_output
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.sweep")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    expand = sub.add_parser("expand", help="write one resolved config and launch per run")
    expand.add_argument("spec", help="sweep YAML")
    add_output(expand, "sweep folder (sweep.json, runs/<name>/)", deprecated=("--out",))
    expand.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    run = sub.add_parser("run", help="run the local runs that have not completed")
    run.add_argument("folder")
    run.add_argument(
        "--only", action="append", metavar="NAME", help="run only this run (repeat for several)"
    )
    status = sub.add_parser("status", help="the runs and their status")
    status.add_argument("folder")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def _expand(args) -> int:
    from mm1_megatron.scaling.sweep.files import write_sweep
    from mm1_megatron.scaling.sweep.spec import describe, load_spec, plan_runs

    if not args.dry_run and not args.output:
        raise ValueError("give --output (the sweep folder) or --dry-run")
    spec = load_spec(args.spec)
    runs = plan_runs(spec, args.output or Path("runs") / spec.name)
    rows = [["run", "params", "steps", "lr", "status"]]
    for run in runs:
        entry = run.entry()
        params = f"{entry['params']:,}" if "params" in entry else "-"
        steps = str(entry.get("train_steps", "-"))
        rows.append([run.name, params, steps, f"{run.lr:.3g}", run.reason or "planned"])
    print(_table(rows))
    print(describe(runs))
    if not args.dry_run:
        print(f"wrote {write_sweep(spec, runs, Path(args.output))}")
    return 0


def _run(args) -> int:
    from mm1_megatron.scaling.sweep.files import run_sweep

    counts = run_sweep(Path(args.folder), only=args.only)
    print(", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0 if counts["failed"] == 0 else 1


def _status(args) -> int:
    from mm1_megatron.scaling.sweep.files import read_sweep

    document = read_sweep(Path(args.folder))
    rows = [["run", "status", "seconds"]]
    rows += [
        [e["name"], e.get("status", "?"), str(e.get("seconds", "-"))] for e in document["runs"]
    ]
    rows += [[e["name"], "pruned: " + e["reason"], "-"] for e in document.get("pruned", [])]
    print(_table(rows))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        return {"expand": _expand, "run": _run, "status": _status}[args.command](args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
