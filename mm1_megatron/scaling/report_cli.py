"""``mm1-report``: one table (CSV, markdown) and PNG plots for the runs of a sweep, with a
power law of final loss against training compute and against parameters.

    mm1-report --sweep SWEEP_DIR --out DIR          # SWEEP_DIR/sweep.json + runs/<name>/
    mm1-report RUN_DIR [RUN_DIR ...] --out DIR      # any run output folders

Exit codes: 0 written, 2 a user mistake (no such folder, a bad option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from mm1_megatron.scaling.report import FIT_AXES, PARAMS_KINDS, Report, build_report
from mm1_megatron.scaling.runs import DEFAULT_LAST_K, LOSS_KINDS, collect_runs
from mm1_megatron.scaling.sweep_runs import collect_sweep
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.report")

PLOT_FILES = {
    "loss_vs_tokens": "loss_vs_tokens.png",
    "loss_vs_flops": "loss_vs_flops.png",
    "final_loss_vs_compute": "final_loss_vs_compute.png",
    "final_loss_vs_params": "final_loss_vs_params.png",
    "eval_vs_compute": "eval_vs_compute.png",
    "throughput": "mfu.png",
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm1-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run folders")
    parser.add_argument("--sweep", type=Path, help="a sweep folder (sweep.json, runs/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.add_argument(
        "--loss",
        choices=("auto", *LOSS_KINDS),
        default="auto",
        help="final loss in the fits: held-out loss at the last step, the mean of the last "
        "--last-k training losses, or auto (held-out when every complete run has it)",
    )
    parser.add_argument("--last-k", type=int, default=DEFAULT_LAST_K, metavar="K")
    parser.add_argument(
        "--params",
        choices=PARAMS_KINDS,
        default="total",
        help="parameter count of the parameters fit (default: the whole model)",
    )
    parser.add_argument(
        "--best-per-size",
        action="store_true",
        help="fit only the lowest final loss of each parameter count (e.g. the best LR)",
    )
    parser.add_argument(
        "--irreducible-loss",
        type=float,
        default=0.0,
        metavar="E",
        help="a known loss floor: fit L = E + a x^-b (default 0, a plain power law)",
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    parser.add_argument("--json", action="store_true", help="also write report.json")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    return parser.parse_args(argv)


def write_plots(report: Report, out: Path) -> List[Path]:
    from mm1_megatron.scaling import plots

    records = report.records
    loss_label = "held-out loss" if report.loss_kind == "heldout" else "training loss"
    written = [
        plots.plot_loss_curves(records, "tokens", out / PLOT_FILES["loss_vs_tokens"]),
        plots.plot_loss_curves(records, "flops", out / PLOT_FILES["loss_vs_flops"]),
    ]
    for axis, key, xlabel, symbol in (
        ("compute", "final_loss_vs_compute", "training FLOPs", "C"),
        ("parameters", "final_loss_vs_params", f"parameters ({report.params_kind})", "N"),
    ):
        points = report.points[axis]
        written.append(
            plots.plot_final_loss(
                points.names,
                points.x,
                points.loss,
                report.fits[axis],
                xlabel=xlabel,
                symbol=symbol,
                loss_label=loss_label,
                path=out / PLOT_FILES[key],
            )
        )
    written.append(plots.plot_eval_scores(records, out / PLOT_FILES["eval_vs_compute"]))
    written.append(plots.plot_throughput(records, out / PLOT_FILES["throughput"]))
    written = [path for path in written if path is not None]
    for name in PLOT_FILES.values():  # a plot not drawn this time must not look current
        stale = out / name
        if stale not in written and stale.is_file():
            stale.unlink()
    return written


def run(args: argparse.Namespace) -> int:
    from mm1_megatron.scaling import tables

    if bool(args.runs) == bool(args.sweep):
        raise ValueError("give either run folders or --sweep SWEEP_DIR (one of the two)")
    for folder in args.runs:
        if not folder.is_dir():
            raise ValueError(f"run folder {folder} does not exist or is not a folder")
    if args.last_k < 1:
        raise ValueError(f"--last-k={args.last_k}: must be >= 1")
    if args.sweep:
        records = collect_sweep(args.sweep, last_k=args.last_k)
    else:
        records = collect_runs(args.runs, last_k=args.last_k)
    report = build_report(
        records,
        loss_kind=args.loss,
        params_kind=args.params,
        best_per_size=args.best_per_size,
        irreducible=args.irreducible_loss,
        num_resamples=args.bootstrap,
        confidence=args.confidence,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot_paths = [] if args.no_plots else write_plots(report, args.out)
    written = [tables.write_csv(report, args.out / "report.csv")]
    markdown_path = args.out / "report.md"
    markdown_path.write_text(tables.markdown(report, plot_paths))
    written.append(markdown_path)
    if args.json:
        written.append(tables.write_json(report, args.out / "report.json"))
    for axis in FIT_AXES:
        fit = report.fits[axis]
        if fit is not None:
            logger.info("final loss vs %s: exponent %.4g, interval %s", axis, fit.b, fit.b_interval)
    logger.info(
        "report of %d runs in %s: %s",
        len(records),
        args.out,
        ", ".join(p.name for p in written + plot_paths),
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        return run(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
