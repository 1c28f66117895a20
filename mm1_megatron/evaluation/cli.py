"""``mm1 eval``: few-shot captioning and VQA scores of a training checkpoint.

    mm1 eval --checkpoint runs/debug/ckpt --output runs/debug/eval \\
        'eval.tasks=[synthetic_caption, synthetic_vqa]' 'eval.shots=[0, 4]'
    mm1 eval --checkpoint CKPT --config my_eval.yaml --output eval --json
    torchrun --nproc-per-node 2 -m mm1_megatron.evaluation.cli --checkpoint CKPT \\
        --output eval --config my_eval.yaml parallel.tensor_parallel_size=2

The config is read as mm1 train reads it, with the checkpoint's own config.yaml first:
then each --config file (merged left to right), then the dotted overrides. The eval
section (eval.tasks, eval.shots, eval.limit, eval.task_paths, eval.max_new_tokens, ...)
says what to evaluate, and is the one evaluation during training reads; parallel.* picks
the layout to evaluate at (the checkpoint may have been written at any TP/PP/EP layout).
A config problem stops before anything is loaded, naming the field (exit 2). Writes
results.json, results.md, predictions/*.jsonl and TensorBoard scalars
(logging.tensorboard) to --output (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Tuple

from mm1_megatron.cli.flags import add_config, add_json, add_output, check_output
from mm1_megatron.utils.logging_setup import setup_logging

if TYPE_CHECKING:
    from mm1_megatron.config import MM1Config
    from mm1_megatron.evaluation.plan import EvalPlan

logger = logging.getLogger("mm1_megatron.evaluation")


# The flags of the eval settings before they became config fields, and what to write now.
REMOVED_FLAGS = {
    "--tasks": "'eval.tasks=[coco_karpathy, vqav2]'",
    "--shots": "'eval.shots=[0, 4, 8]'",
    "--task-paths": "eval.task_paths=tasks.yaml",
    "--limit": "eval.limit=N (eval.limit=null: every example)",
    "--batch-size": "eval.batch_size=N",
    "--num-beams": "eval.num_beams=N",
    "--max-new-tokens": "eval.max_new_tokens=N",
    "--seed": "eval.seed=N",
    "--demos": "eval.demo_selection=random|similar",
    "--on-bad": "eval.on_bad=stop|skip",
    "--text-demos-at-zero": "eval.text_demos_at_zero=true",
    "--vqa-mode": "eval.vqa_mode=official|openflamingo",
    "--no-tensorboard": "logging.tensorboard=false",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="a checkpoint folder (step_XXXXXXXX) or a save folder (its newest checkpoint)",
    )
    add_config(
        parser,
        "YAML config file merged over the checkpoint's config.yaml (usually an eval: section)",
    )
    add_output(
        parser,
        "folder for results.json and the rest",
        required=True,
        deprecated=("--output-dir",),
        type=Path,
    )
    add_json(parser, "the results (the files in --output are written as always)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="dotted overrides applied after the files, e.g. 'eval.tasks=[vqav2]'",
    )
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    words = sys.argv[1:] if argv is None else argv
    removed = [w.split("=", 1)[0] for w in words if w.split("=", 1)[0] in REMOVED_FLAGS]
    if removed:
        parser.error(
            "the eval settings are config fields now, set in a --config file or as dotted "
            "overrides (docs/evaluation.md): "
            + "; ".join(f"{flag} -> {REMOVED_FLAGS[flag]}" for flag in dict.fromkeys(removed))
        )
    # Overrides may come before or after flags.
    return check_output(parser.parse_intermixed_args(argv))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    # With --json, stdout carries the results and nothing else: Python-level prints of
    # anything the evaluation runs go to stderr with the log.
    quiet = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with quiet:
            document = run(args)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    if args.json and document is not None:
        print(json.dumps(document), flush=True)
    return 0


def configure(args: argparse.Namespace) -> Tuple[MM1Config, EvalPlan]:
    """The validated config and its ``EvalPlan``: every config problem raises here, before
    a task or the model is loaded."""
    from mm1_megatron.evaluation.model import checkpoint_config
    from mm1_megatron.evaluation.plan import EvalPlan

    cfg = checkpoint_config(args.checkpoint, args.overrides, configs=args.config)
    if not _limit_given(args):
        # The checkpoint's config.yaml holds the training run's eval.limit (16 by default,
        # for evaluation during training); a score of the checkpoint uses every example
        # unless this command's files or overrides say otherwise.
        cfg.eval.limit = None
    plan = EvalPlan.from_config(cfg)
    if not plan.tasks:
        raise ValueError(
            "eval.tasks is empty: name the tasks to score, e.g. "
            "'eval.tasks=[synthetic_caption, synthetic_vqa]' (docs/evaluation.md lists them)"
        )
    return cfg, plan


def _limit_given(args: argparse.Namespace) -> bool:
    """Whether an override or a ``--config`` file of this command sets ``eval.limit``."""
    import yaml

    if any(word.split("=", 1)[0] == "eval.limit" for word in args.overrides):
        return True
    for path in args.config:
        document = yaml.safe_load(Path(path).read_text()) or {}
        section = document.get("eval") if isinstance(document, dict) else None
        if isinstance(section, dict) and "limit" in section:
            return True
    return False


def run(args: argparse.Namespace) -> Optional[dict]:
    """Evaluate; the results document (as ``results.json``) on the main rank, else None."""
    from mm1_megatron.evaluation.evaluator import ShotEvaluator
    from mm1_megatron.evaluation.model import describe_layout, load_eval_model
    from mm1_megatron.evaluation.prompting import PromptBuilder
    from mm1_megatron.evaluation.report import results_document, write_outputs
    from mm1_megatron.parallel import shutdown_distributed

    cfg, plan = configure(args)
    if plan.limit is not None:
        logger.info(
            "eval.limit=%d: a seeded subset of at most %d examples per task "
            "(eval.limit=null: every example)",
            plan.limit,
            plan.limit,
        )
    tasks = plan.load_tasks()
    loaded = load_eval_model(args.checkpoint, cfg=cfg)
    try:
        evaluator = ShotEvaluator(
            loaded.model,
            PromptBuilder(loaded.cfg, loaded.tokenizer),
            loaded.tokenizer,
            plan.protocol,
        )
        results = []
        for task in tasks:
            for shots in plan.shots:
                result = evaluator.run(task, shots, plan.decoding)
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
        if not loaded.ctx.is_main:
            return None
        header = {
            "checkpoint": str(loaded.checkpoint),
            "step": loaded.step,
            "layout": describe_layout(loaded.cfg),
            "protocol": plan.protocol.describe(),
            "decoding": vars(plan.decoding),
            "limit": plan.limit,
            "skipped": {task.name: task.skipped for task in tasks},
        }
        write_outputs(
            results,
            header,
            args.output,
            tensorboard=cfg.logging.tensorboard,
            step=loaded.step,
        )
        return results_document(results, header)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    sys.exit(main())
