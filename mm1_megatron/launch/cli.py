"""``mm1 launch``: cluster launch files rendered from the stacked config files.

    mm1 launch render --config configs/mm1_30b.yaml \\
        --config cluster/overlays/example_h100.yaml --target all --output launch/mm1_30b
    mm1 launch render --config ... --dry-run        # render to a temporary folder, check
    mm1 launch check launch/mm1_30b                 # still matches its configs? files sound?

Exit code 0 when everything checks, 1 when a rendered file fails a check, 2 for a bad
config or layout (the message names the fields). See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import List, Optional

from mm1_megatron.cli.flags import add_config, add_output
from mm1_megatron.launch.checks import check_rendered
from mm1_megatron.launch.plan import plan_launch
from mm1_megatron.launch.render import TARGETS, write_rendered
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.launch")

EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1 launch", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    render = commands.add_parser("render", help="render launch files from config files")
    add_config(render, "model config, then cluster overlays", required=True)
    render.add_argument(
        "--target",
        action="append",
        choices=[*TARGETS, "all"],
        help="what to render (repeatable; default: all)",
    )
    add_output(render, "folder to write the files to", type=Path, deprecated=("--out",))
    render.add_argument(
        "--dry-run", action="store_true", help="render into a temporary folder and check it"
    )
    render.add_argument("--skip-shellcheck", action="store_true")
    render.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="dotted overrides"
    )
    check = commands.add_parser("check", help="check a rendered folder")
    check.add_argument("folder", type=Path)
    check.add_argument("--skip-shellcheck", action="store_true")
    return parser


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "render" and args.dry_run == (args.output is not None):
        parser.error("render: give --output FOLDER or --dry-run (one of the two)")
    return args


def _report(problems: List[str], folder: Path) -> int:
    for problem in problems:
        logger.error("%s", problem)
    if problems:
        return EXIT_CHECK_FAILED
    logger.info("%s: all launch files check", folder)
    return 0


def _render(args: argparse.Namespace) -> int:
    plan = plan_launch(args.config, args.overrides)
    logger.info("layout: %s", plan.layout.describe())
    targets = args.target or ["all"]
    run_shellcheck = not args.skip_shellcheck
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="mm1-launch-") as tmp:
            write_rendered(plan, targets, Path(tmp))
            return _report(check_rendered(Path(tmp), run_shellcheck=run_shellcheck), Path(tmp))
    write_rendered(plan, targets, args.output)
    return _report(check_rendered(args.output, run_shellcheck=run_shellcheck), args.output)


def main(argv: Optional[List[str]] = None) -> int:
    setup_logging()
    args = _parse(argv)
    try:
        if args.command == "render":
            return _render(args)
        return _report(
            check_rendered(args.folder, run_shellcheck=not args.skip_shellcheck), args.folder
        )
    except ValueError as exc:  # the config, the cluster settings or the layout
        logger.error("%s", exc)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    raise SystemExit(main())
