"""``mm1 balance``: how evenly the configured data spreads vision work over data-parallel
ranks and micro-batches, placed as today (rank r takes every D-th sequence) and balanced
(``data.balance``), and the step time each gives under ``mm1 estimate``'s model.

    mm1 balance --config configs/mm1_30b.yaml --dp 4
    mm1 balance --config configs/mm1_30b.yaml --dp 64 --steps 50 --output balance.json
    mm1 balance --config configs/mm1_3b.yaml --dp 8 --pp 2 --per-step data.source=webdataset ...

Costs come from the data's metadata, as the loader plans them (images or tiles, native
patches, the decoder's attention pairs; no image is decoded). The GPU count is the
config's TP x PP (``--pp`` replaces PP) x ``--dp``. ``--output`` writes the figures and the
histogram of images per sequence that ``mm1 estimate --images-distribution`` reads.
Exit code 0, or 2 for a bad config or option (the message names it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from mm1_megatron.cli.flags import add_config, add_json
from mm1_megatron.scaling.estimate.hardware import GPU_TYPES

logger = logging.getLogger("mm1_megatron.balance")
DEFAULT_STEPS = 20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 balance",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(parser, "YAML config (required)", required=True)
    parser.add_argument("--dp", type=int, required=True, help="data-parallel size to plan for")
    parser.add_argument("--pp", type=int, default=None, help="pipeline stages (default: config)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="global batches read")
    parser.add_argument("--gpu-type", default="h100", choices=sorted(GPU_TYPES))
    parser.add_argument("--per-step", action="store_true", help="one line per step as well")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the figures (JSON)")
    add_json(parser, "the figures")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser


def _layout_config(cfg, args):
    """The config at ``--pp`` (an even split when it differs from the config's)."""
    par = cfg.parallel
    if args.pp is not None and args.pp != par.pipeline_parallel_size:
        par = dataclasses.replace(
            par,
            pipeline_parallel_size=args.pp,
            num_decoder_layers_on_vision_stage=None,
            num_decoder_layers_on_last_stage=None,
        )
    return dataclasses.replace(cfg, parallel=par)


def _check(cfg, args) -> int:
    """The GPU count of the layout; raises ValueError for one that cannot run."""
    from mm1_megatron.scaling.estimate.estimator import config_layout_error

    if args.dp < 1 or args.steps < 1:
        raise ValueError(f"--dp={args.dp} and --steps={args.steps} must be >= 1")
    par, t = cfg.parallel, cfg.training
    if t.global_batch_size % (t.micro_batch_size * args.dp):
        raise ValueError(
            f"training.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size {t.micro_batch_size} x --dp {args.dp}"
        )
    num_gpus = (
        par.tensor_parallel_size * par.context_parallel_size * par.pipeline_parallel_size * args.dp
    )
    error = config_layout_error(cfg, num_gpus)
    if error:
        raise ValueError(f"DP={args.dp} on {num_gpus} GPUs: {error}")
    return num_gpus


def run(cfg, args) -> Dict[str, object]:
    """Read ``args.steps`` global batches and measure both placements."""
    from mm1_megatron.data.build import build_run_data
    from mm1_megatron.data.pipeline.tiling import tile_size
    from mm1_megatron.scaling.balance.report import (
        PLACEMENTS,
        PlacementFigures,
        StageModel,
        global_batch_costs,
        image_histogram,
        measure_step,
        summarize,
    )
    from mm1_megatron.scaling.estimate.estimator import DEFAULT_EFFICIENCY, estimate_config
    from mm1_megatron.scaling.estimate.hardware import gpu_type
    from mm1_megatron.scaling.estimate.workload import default_workload
    from mm1_megatron.training.flops import balance_weights
    from mm1_megatron.utils.progress import ProgressLine

    num_gpus = _check(cfg, args)
    builder = build_run_data(cfg)[0].builder
    t = cfg.training
    weights = balance_weights(cfg.model, tile_size(cfg.data.tiling))
    progress = ProgressLine("reading costs", args.steps * t.global_batch_size, unit="sequences")
    steps = []
    for step in range(args.steps):
        first = step * t.global_batch_size
        steps.append(global_batch_costs(builder.sequence_cost, first, t.global_batch_size))
        progress.update(t.global_batch_size)
    progress.close()
    all_costs = np.concatenate(steps)
    mean_images = float(all_costs[:, 0].mean())
    memory_workload = default_workload(cfg)
    estimate = estimate_config(
        cfg,
        num_gpus=num_gpus,
        gpu=gpu_type(args.gpu_type),
        workload=default_workload(cfg, mean_images),
        memory_workload=memory_workload,
    )
    stage_model = StageModel.of(cfg, estimate, DEFAULT_EFFICIENCY)
    fixed = estimate.step.data_parallel_exposed + estimate.step.optimizer
    figures = {name: PlacementFigures() for name in PLACEMENTS}
    for costs in steps:
        measure_step(
            costs,
            weights,
            figures,
            dp_size=args.dp,
            micro_batch_size=t.micro_batch_size,
            order=cfg.data.balance.micro_batch_order,
            stage_model=stage_model,
            fixed_seconds=fixed,
        )
    return {
        "config": args.config,
        "data_source": cfg.data.source,
        "steps": args.steps,
        "global_batch_size": t.global_batch_size,
        "micro_batch_size": t.micro_batch_size,
        "num_microbatches": t.global_batch_size // (t.micro_batch_size * args.dp),
        "layout": estimate.layout.to_dict(),
        "num_gpus": num_gpus,
        "gpu": args.gpu_type,
        "images_per_sequence": image_histogram(all_costs),
        "mean_images_per_sequence": mean_images,
        "placements": {
            name: {
                "rank_vision": summarize(f.rank_vision),
                "rank_varying": summarize(f.rank_varying),
                "slot_stage": summarize(f.slot_stage),
                "rank_stage": summarize(f.rank_stage),
                "step_seconds": summarize(f.step_seconds),
                "per_step": {
                    "rank_vision": f.rank_vision,
                    "rank_varying": f.rank_varying,
                    "step_seconds": f.step_seconds,
                },
            }
            for name, f in figures.items()
        },
    }


def _row(label: str, result: Dict[str, object], key: str, fmt: str) -> str:
    cells = []
    for name in ("natural", "balanced"):
        s = result["placements"][name][key]
        cells.append(" ".join(format(s[q], fmt) for q in ("median", "p90", "max")))
    return f"{label:<34} {cells[0]:>26}   {cells[1]:>26}"


def report_lines(result: Dict[str, object], per_step: bool) -> List[str]:
    lay = result["layout"]
    lines = [
        f"mm1 balance: {result['config']} ({result['data_source']} data), "
        f"{result['steps']} steps of {result['global_batch_size']} sequences",
        f"layout TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} on {result['num_gpus']} x "
        f"{result['gpu']}: {result['num_microbatches']} micro-batches of "
        f"{result['micro_batch_size']} per rank per step",
        f"images (tiles) per sequence: mean {result['mean_images_per_sequence']:.2f}, "
        f"histogram {result['images_per_sequence']}",
        "",
        f"{'max / mean over DP ranks':<34} {'natural: median p90 max':>26}   "
        f"{'balanced: median p90 max':>26}",
        _row("vision FLOPs per rank, per step", result, "rank_vision", ".3f"),
        _row("vision + attention per rank", result, "rank_varying", ".3f"),
        _row("vision stage per slot (over ranks)", result, "slot_stage", ".3f"),
        _row("vision stage per micro-batch (rank)", result, "rank_stage", ".3f"),
        _row("estimated step time (s)", result, "step_seconds", ".4g"),
    ]
    natural = result["placements"]["natural"]["step_seconds"]["mean"]
    balanced = result["placements"]["balanced"]["step_seconds"]["mean"]
    lines.append(
        f"mean estimated step: {natural:.4g} s placed naturally, {balanced:.4g} s balanced "
        f"({(balanced - natural) / natural:+.1%})"
    )
    if per_step:
        lines += ["", "step  vision/rank natural  balanced   step s natural  balanced"]
        n, b = result["placements"]["natural"], result["placements"]["balanced"]
        for i in range(result["steps"]):
            lines.append(
                f"{i:>4}  {n['per_step']['rank_vision'][i]:>19.3f}  "
                f"{b['per_step']['rank_vision'][i]:>8.3f}   "
                f"{n['per_step']['step_seconds'][i]:>14.2f}  "
                f"{b['per_step']['step_seconds'][i]:>8.2f}"
            )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from mm1_megatron.config import load_config, validate_config

    try:
        cfg = _layout_config(validate_config(load_config(args.config, args.overrides)), args)
        result = run(validate_config(cfg), args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result))
    else:
        for line in report_lines(result, args.per_step):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
