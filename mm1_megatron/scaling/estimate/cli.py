"""``mm1 estimate``: parameters, FLOPs and memory per GPU of a config, and its layouts
ranked by estimated step time for a GPU count.

    mm1 estimate --config configs/mm1_30b.yaml --gpus 64
    mm1 estimate --config configs/mm1_7b.yaml --gpus 16 --gpu-type h200 --top 5 --json
    mm1 estimate --config configs/mm1_3b.yaml --gpus 8 parallel.recompute=full
    mm1 estimate --config configs/mm1_30b.yaml --gpus 64 --images-distribution balance.json
    mm1 estimate --config configs/mm1_30b.yaml --gpus 64 --max-seq-length \
        parallel.context_parallel_size=2
    mm1 estimate --config configs/mm1_30b.yaml --gpus 64 --max-frames \
        parallel.context_parallel_size=4

Without ``--gpus`` the config's own layout is estimated on the fewest GPUs it runs on.
Every figure is a model with stated assumptions (printed at the end; docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import List, Optional

from mm1_megatron.cli.flags import add_config, add_json
from mm1_megatron.scaling.estimate.estimator import (
    ASSUMPTIONS,
    DEFAULT_EFFICIENCY,
    DEFAULT_MEMORY_MARGIN,
    Estimate,
    config_layout_error,
    default_num_gpus,
    estimate_config,
    gib,
    parameter_summary,
    rank_layouts,
)
from mm1_megatron.scaling.estimate.frames_fit import (
    DEFAULT_TEXT_TOKENS,
    FramesFit,
    describe_frame_fits,
    max_frames,
)
from mm1_megatron.scaling.estimate.hardware import GPU_TYPES, gpu_type
from mm1_megatron.scaling.estimate.image_counts import load_image_counts
from mm1_megatron.scaling.estimate.layouts import apply_layout
from mm1_megatron.scaling.estimate.seq_length_fit import LengthFit, describe_fits, max_seq_length
from mm1_megatron.scaling.estimate.vision_stage import recommend_vision_stage
from mm1_megatron.scaling.estimate.workload import (
    default_workload,
    describe_image_size,
    max_images_per_sequence,
    vision_tokens_per_image,
)

logger = logging.getLogger("mm1_megatron.estimate")

COMPONENTS = ("vision_encoder", "connector", "embedding", "decoder", "logits")
COLUMNS = ("vision", "connector", "embedding", "decoder", "logits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 estimate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(parser, "YAML config (required)")
    parser.add_argument("--gpus", type=int, default=None, help="GPU count to plan for")
    parser.add_argument("--gpu-type", default="h100", choices=sorted(GPU_TYPES))
    parser.add_argument("--top", type=int, default=10, help="layouts to list")
    add_json(parser, "the parameters, FLOPs, memory and ranked layouts")
    parser.add_argument(
        "--efficiency",
        type=float,
        default=DEFAULT_EFFICIENCY,
        help=f"share of the dense BF16 peak the matmuls reach (default {DEFAULT_EFFICIENCY})",
    )
    parser.add_argument(
        "--memory-margin",
        type=float,
        default=DEFAULT_MEMORY_MARGIN,
        help=f"share of GPU memory kept free (default {DEFAULT_MEMORY_MARGIN})",
    )
    images = parser.add_mutually_exclusive_group()
    images.add_argument(
        "--images-per-sequence",
        type=int,
        default=None,
        help="images (tiles) per sequence (default: the cap data.max_images_per_sequence)",
    )
    images.add_argument(
        "--images-distribution",
        default=None,
        metavar="FILE",
        help="JSON histogram of images per sequence (mm1 balance --output), or `mm1` for "
        "the synthetic world's at MM1's mixture: FLOPs and step time at its mean, the "
        "vision stage per micro-batch; memory stays at the cap",
    )
    parser.add_argument(
        "--max-seq-length",
        action="store_true",
        help="also find the longest training.seq_length that fits, for the config's layout "
        "and each listed layout (images per sequence follow the length)",
    )
    parser.add_argument(
        "--max-frames",
        action="store_true",
        help="also find the most video frames per sequence that fit, for the same layouts "
        "(each frame an image after its time marker; docs/video.md)",
    )
    parser.add_argument(
        "--video-text-tokens",
        type=int,
        default=DEFAULT_TEXT_TOKENS,
        help=f"--max-frames: the video's text tokens (default {DEFAULT_TEXT_TOKENS})",
    )
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _fmt_count(n: float) -> str:
    return f"{int(n):,}"


def _memory_table(estimate: Estimate) -> List[str]:
    """One row per pipeline stage; activation columns cover all in-flight micro-batches,
    ``at peak`` is what the peak moment adds (gradients) or has already freed."""
    header = (
        f"{'stage':>5} {'layers':>6} {'in-flight':>9} {'weights':>8} {'grads':>7} "
        f"{'optim':>7} " + " ".join(f"{c:>9}" for c in COLUMNS) + f" {'at peak':>8} "
        f"{'total':>7}"
    )
    lines = [header]
    for s in estimate.memory.stages:
        acts = " ".join(f"{gib(s.activations.get(c, 0.0)):9.2f}" for c in COMPONENTS)
        lines.append(
            f"{s.stage:>5} {s.num_decoder_layers:>6} {s.in_flight:>9} {gib(s.weights):8.2f} "
            f"{gib(s.gradients):7.2f} {gib(s.optimizer_states):7.2f} {acts} "
            f"{gib(sum(s.transients.values())):8.2f} {gib(s.total):7.2f}"
        )
    return lines


def _layout_table(estimates: List[Estimate], top: int) -> List[str]:
    lines = [
        f"{'rank':>4} {'TP':>3} {'CP':>3} {'PP':>3} {'DP':>4} {'EP':>3} {'SP':>3} {'recompute':>9} "
        f"{'split':>7} {'peak GiB':>8} {'step s':>7} {'bubble':>6} {'MFU':>5} {'tok/s/GPU':>9}"
    ]
    for rank, e in enumerate(estimates[:top], 1):
        lay = e.layout
        split = f"{lay.vision_stage_layers}/{lay.last_stage_layers}" if lay.pp > 1 else "-"
        lines.append(
            f"{rank:>4} {lay.tp:>3} {lay.cp:>3} {lay.pp:>3} {lay.dp:>4} {lay.ep:>3} "
            f"{'on' if lay.sp else 'off':>3} {lay.recompute:>9} {split:>7} "
            f"{gib(e.memory.peak):8.1f} {e.step.step:7.2f} {e.step.bubble_fraction:6.1%} "
            f"{e.mfu:5.1%} {e.tokens_per_second_per_gpu:9.0f}"
        )
    return lines


def _print_report(
    cfg_name, params, estimate, config_error, ranking, args, images, fits=(), frame_fits=()
) -> None:
    """``images``: how the workload's images are sized, the distribution, the advice."""
    image_size, counts, advice, memory_workload = images
    gpu = estimate.gpu if estimate else gpu_type(args.gpu_type)
    out = print  # the command's report (the library logs)
    out(f"mm1 estimate: {cfg_name}")
    out(
        f"Parameters: total {_fmt_count(params['total'])} (vision encoder "
        f"{_fmt_count(params['vision_encoder'])}, connector {_fmt_count(params['connector'])}, "
        f"language model {_fmt_count(params['language_model'])}; LLM active non-embedding "
        f"{_fmt_count(params['llm_active_non_embedding'])}); active per token "
        f"{_fmt_count(params['active'])}"
    )
    if estimate is not None:
        w, f = estimate.workload, estimate.flops
        per_sequence = f"{w.images_per_sequence:g}" if counts is None else f"{counts.mean:.2f}"
        out(
            f"Workload: {w.seq_length} tokens, {per_sequence} images per sequence "
            f"{image_size}, one document per sequence; global batch "
            f"{estimate.global_batch_size}"
        )
        if counts is not None:
            out(
                f"Images per sequence measured ({args.images_distribution}): "
                f"{counts.describe()}; FLOPs and step time at the mean, memory at the cap "
                f"{memory_workload.images_per_sequence:g}"
            )
        out(
            f"Training FLOPs per sequence {f.total:.3e} (ViT {f.vision_encoder:.3e}, connector "
            f"{f.connector:.3e}, decoder layers {f.decoder_layers:.3e}, attention "
            f"{f.decoder_attention:.3e}, output layer {f.output_layer:.3e}); per step "
            f"{estimate.flops_per_step:.3e}"
        )
        lay = estimate.layout
        out("")
        out(
            f"Memory per GPU (GiB) of the config's layout {lay.describe()} on {estimate.num_gpus} "
            f"x {gpu.name}:"
        )
        for line in _memory_table(estimate):
            out(line)
        verdict = "fits" if estimate.fits else "DOES NOT FIT"
        out(
            f"peak {gib(estimate.memory.peak):.1f} GiB of {gib(estimate.usable_bytes):.1f} GiB "
            f"usable ({gib(gpu.memory_bytes):.1f} GiB less {args.memory_margin:.0%}): {verdict}; "
            f"step {estimate.step.step:.2f} s, MFU {estimate.mfu:.1%}"
        )
        if advice is not None:
            out("")
            for line in advice.describe():
                out(line)
    if config_error:
        out(f"The config's own layout does not run on {args.gpus} GPUs: {config_error}")
    if ranking is not None:
        out("")
        out(
            f"Layouts on {args.gpus} x {gpu.name} by estimated step time "
            f"({ranking.num_layouts} valid, {len(ranking.fitting)} fit in memory; compute at "
            f"{args.efficiency:.0%} of peak):"
        )
        for line in _layout_table(ranking.fitting, args.top):
            out(line)
        if not ranking.fitting and ranking.over_memory:
            out("No layout fits; the smallest peaks (more GPUs, or a bigger GPU, needed):")
            for line in _layout_table(ranking.over_memory, args.top):
                out(line)
    if fits:
        out("")
        for line in describe_fits(fits, gpu, args.memory_margin):
            out(line)
    if frame_fits:
        out("")
        for line in describe_frame_fits(
            frame_fits, gpu, args.memory_margin, args.video_text_tokens
        ):
            out(line)
    out("")
    out("Assumptions:")
    for item in ASSUMPTIONS:
        out(f"- {item}")


def _fit_layouts(cfg, args, estimate, ranking) -> list:
    """``(config, layout)`` for the config's layout (when it runs on the GPUs) and each
    listed layout: what ``--max-seq-length`` and ``--max-frames`` answer for."""
    layouts = [estimate.layout] if estimate is not None else []
    if ranking is not None:
        listed = ranking.fitting or ranking.over_memory
        layouts += [e.layout for e in listed[: args.top] if e.layout not in layouts]
    return [
        (cfg if i == 0 and estimate is not None else apply_layout(cfg, layout), layout)
        for i, layout in enumerate(layouts)
    ]


def _fits_at_layouts(search, wanted: bool, cfg, args, num_gpus, gpu, estimate, ranking, **extra):
    """``search`` (``max_seq_length`` or ``max_frames``) at each of ``_fit_layouts``, when
    its flag (``wanted``) is given."""
    if not wanted:
        return []
    return [
        search(
            config,
            layout,
            num_gpus=num_gpus,
            gpu=gpu,
            memory_margin=args.memory_margin,
            **extra,
        )
        for config, layout in _fit_layouts(cfg, args, estimate, ranking)
    ]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from mm1_megatron.config import load_config, validate_config

    try:
        if not args.config:
            raise ValueError("--config is required (e.g. --config configs/mm1_30b.yaml)")
        cfg = validate_config(load_config(args.config, args.overrides))
        if args.gpus is not None and args.gpus < 1:
            raise ValueError(f"--gpus={args.gpus} must be >= 1")
        if args.top < 1 or not 0 <= args.memory_margin < 1:
            raise ValueError("--top must be >= 1 and --memory-margin in [0, 1)")
        gpu = gpu_type(args.gpu_type)
        counts = None
        memory_workload = workload = default_workload(cfg, args.images_per_sequence)
        if args.images_distribution:
            counts = load_image_counts(args.images_distribution)
            workload = default_workload(cfg, counts.mean)
            if counts.max > memory_workload.images_per_sequence:
                logger.warning(
                    "%s: sequences with %d images, over the cap %d the memory is sized for",
                    args.images_distribution,
                    counts.max,
                    max_images_per_sequence(cfg),
                )
        num_gpus = args.gpus or default_num_gpus(cfg)
        knobs = dict(
            efficiency=args.efficiency,
            memory_margin=args.memory_margin,
            memory_workload=memory_workload,
        )
        config_error = config_layout_error(cfg, num_gpus)
        estimate = advice = None
        if config_error is None:
            estimate = estimate_config(cfg, num_gpus=num_gpus, gpu=gpu, workload=workload, **knobs)
            advice = recommend_vision_stage(
                cfg, num_gpus=num_gpus, gpu=gpu, workload=workload, images=counts, **knobs
            )
        ranking = None
        if args.gpus is not None:
            ranking = rank_layouts(cfg, num_gpus=num_gpus, gpu=gpu, workload=workload, **knobs)
        where = (cfg, args, num_gpus, gpu, estimate, ranking)
        fits: List[LengthFit] = _fits_at_layouts(
            max_seq_length,
            args.max_seq_length,
            *where,
            images_per_sequence=args.images_per_sequence,
        )
        frame_fits: List[FramesFit] = _fits_at_layouts(
            max_frames, args.max_frames, *where, text_tokens=args.video_text_tokens
        )
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    params = parameter_summary(cfg)
    if args.json:
        flops = estimate.flops.to_dict() if estimate else None
        report = {
            "configs": args.config,
            "overrides": args.overrides,
            "gpu": gpu.to_dict(),
            "num_gpus": num_gpus,
            "efficiency": args.efficiency,
            "memory_margin": args.memory_margin,
            "workload": {
                **workload.to_dict(),
                # At native resolution image_size is the position table's; every image is
                # counted at model.vision.max_patches patches.
                "native_resolution": cfg.model.vision.native_resolution,
                "vision_tokens_per_image": vision_tokens_per_image(cfg.model, workload),
                "memory_images_per_sequence": memory_workload.images_per_sequence,
            },
            "images_distribution": counts.to_dict() if counts else None,
            "vision_stage": advice.to_dict() if advice else None,
            "parameters": params,
            "flops_per_sequence": flops,
            "flops_per_step": estimate.flops_per_step if estimate else None,
            "config_layout": estimate.to_dict() if estimate else {"error": config_error},
            "layouts": [e.to_dict() for e in ranking.fitting[: args.top]] if ranking else [],
            "over_memory": [e.to_dict() for e in ranking.over_memory[: args.top]]
            if ranking
            else [],
            "num_valid_layouts": ranking.num_layouts if ranking else None,
            "max_seq_length": [fit.to_dict() for fit in fits],
            "max_frames": [fit.to_dict() for fit in frame_fits],
            "assumptions": list(ASSUMPTIONS),
        }
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.gpus is None:
        args.gpus = num_gpus
    images = (describe_image_size(cfg.model, workload), counts, advice, memory_workload)
    name = " + ".join(args.config)
    _print_report(name, params, estimate, config_error, ranking, args, images, fits, frame_fits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
