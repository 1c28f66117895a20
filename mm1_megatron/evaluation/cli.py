"""``mm1-eval``: few-shot captioning and VQA scores of a training checkpoint.

    mm1-eval --checkpoint runs/debug/checkpoints --tasks synthetic_caption,synthetic_vqa \\
        --shots 0,4 --output-dir runs/debug/eval
    torchrun --nproc-per-node 2 -m mm1_megatron.evaluation.cli --checkpoint CKPT \\
        --tasks coco_karpathy,vqav2 --task-paths tasks.yaml --shots 0,4,8 \\
        --output-dir eval parallel.tensor_parallel_size=2

The checkpoint may have been written at any TP/PP/EP layout; dotted overrides choose the
one evaluated at. Writes results.json, results.md, predictions/*.jsonl and TensorBoard
scalars to --output-dir (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional

from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.evaluation")


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"shot counts must be >= 0, got {text!r}")
    return values


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mm1-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint or save folder")
    parser.add_argument("--tasks", required=True, help="comma-separated task names")
    parser.add_argument("--shots", type=_int_list, default=[0], help="e.g. 0,4,8")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument(
        "--task-paths", type=Path, help="YAML of dataset files (docs/evaluation.md)"
    )
    parser.add_argument("--limit", type=int, help="evaluate a seeded subset of this many examples")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")
    parser.add_argument("--num-beams", type=int, help="default: per task (3 for COCO/VQA)")
    parser.add_argument("--max-new-tokens", type=int, help="default: per task")
    parser.add_argument("--seed", type=int, default=0, help="demonstration draw")
    parser.add_argument(
        "--demos",
        choices=("random", "similar"),
        default="random",
        help="demonstrations drawn at random, or the most similar images by the model's own "
        "encoder (RICES)",
    )
    parser.add_argument(
        "--on-bad",
        choices=("stop", "skip"),
        default="stop",
        help="a missing image or malformed annotation: stop before generating (default) "
        "or skip and count it",
    )
    parser.add_argument(
        "--text-demos-at-zero",
        action="store_true",
        help="0-shot prompts carry two text-only demonstrations (OpenFlamingo)",
    )
    parser.add_argument("--vqa-mode", choices=("official", "openflamingo"), default="official")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    try:
        return run(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2


def run(args: argparse.Namespace) -> int:
    from mm1_megatron.evaluation.evaluator import DecodeSettings, ShotEvaluator
    from mm1_megatron.evaluation.model import describe_layout, load_eval_model
    from mm1_megatron.evaluation.prompting import PromptBuilder
    from mm1_megatron.evaluation.protocol import Protocol
    from mm1_megatron.evaluation.report import write_outputs
    from mm1_megatron.evaluation.tasks import load_task, task_spec
    from mm1_megatron.parallel import shutdown_distributed

    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    for name in names:
        task_spec(name)  # unknown names fail before anything is loaded
    if args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
    tasks = [
        load_task(name, args.task_paths, on_bad=args.on_bad, limit=args.limit, seed=args.seed)
        for name in names
    ]
    for task in tasks:
        if max(args.shots) > len(task.demo_examples):
            raise ValueError(
                f"{task.name}: {max(args.shots)} shots need that many demonstrations; its "
                f"train split has {len(task.demo_examples)}"
            )
    loaded = load_eval_model(args.checkpoint, args.overrides)
    try:
        protocol = Protocol(
            seed=args.seed,
            demo_selection=args.demos,
            text_demos_at_zero=args.text_demos_at_zero,
        )
        settings = DecodeSettings(
            batch_size=args.batch_size,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            vqa_mode=args.vqa_mode,
        )
        evaluator = ShotEvaluator(
            loaded.model, PromptBuilder(loaded.cfg, loaded.tokenizer), loaded.tokenizer, protocol
        )
        results = []
        for task in tasks:
            for shots in args.shots:
                result = evaluator.run(task, shots, settings)
                logger.info(
                    "%s %d-shot: %s %.4f on %d examples (%.1f s)",
                    task.name,
                    shots,
                    result.metric,
                    result.score,
                    result.num_examples,
                    result.seconds,
                )
                results.append(result)
        if loaded.ctx.is_main:
            header = {
                "checkpoint": str(loaded.checkpoint),
                "step": loaded.step,
                "layout": describe_layout(loaded.cfg),
                "protocol": protocol.describe(),
                "decoding": vars(settings),
                "skipped": {task.name: task.skipped for task in tasks},
            }
            write_outputs(
                results,
                header,
                args.output_dir,
                tensorboard=not args.no_tensorboard,
                step=loaded.step,
            )
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
