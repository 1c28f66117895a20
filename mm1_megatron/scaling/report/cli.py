"""``mm1 report``: one table (CSV, markdown, JSON) and PNG plots for the runs of a sweep,
with a power law of final loss against training compute and against parameters.

    mm1 report --sweep SWEEP_DIR --output DIR       # SWEEP_DIR/sweep.json + runs/<name>/
    mm1 report RUN_DIR [RUN_DIR ...] --output DIR   # any run output folders
    mm1 report --sweep SWEEP_DIR --output DIR --json | jq .fits   # report.json on stdout

Exit codes: 0 written, 2 a user mistake (no such folder, a bad option).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from mm1_megatron.cli.flags import add_json, add_output, check_output
from mm1_megatron.scaling.report.analysis import FIT_AXES, PARAMS_KINDS, Report, build_report
from mm1_megatron.scaling.report.runs import DEFAULT_LAST_K, LOSS_KINDS, collect_runs
from mm1_megatron.scaling.report.sweep_runs import collect_sweep
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1 report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run folders")
    parser.add_argument("--sweep", type=Path, help="a sweep folder (sweep.json, runs/)")
    add_output(
        parser,
        "folder for the report",
        required=True,
        type=Path,
        metavar="FOLDER",
        deprecated=("--out",),
    )
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
    add_json(parser, "report.json (always written to --output)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return check_output(build_parser().parse_args(argv))


def write_plots(report: Report, out: Path) -> List[Path]:
    from mm1_megatron.scaling.report import plots

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
    from mm1_megatron.scaling.report import tables

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
    args.output.mkdir(parents=True, exist_ok=True)
    plot_paths = [] if args.no_plots else write_plots(report, args.output)
    written = [tables.write_csv(report, args.output / "report.csv")]
    markdown_path = args.output / "report.md"
    markdown_path.write_text(tables.markdown(report, plot_paths))
    written.append(markdown_path)
    json_path = tables.write_json(report, args.output / "report.json")
    written.append(json_path)
    for axis in FIT_AXES:
        fit = report.fits[axis]
        if fit is not None:
            logger.info("final loss vs %s: exponent %.4g, interval %s", axis, fit.b, fit.b_interval)
    logger.info(
        "report of %d runs in %s: %s",
        len(records),
        args.output,
        ", ".join(p.name for p in written + plot_paths),
    )
    if args.json:  # the file as written: one JSON object, the only thing on stdout
        sys.stdout.write(json_path.read_text())
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
