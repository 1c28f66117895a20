"""What an evaluation writes: ``results.json``, per-sample predictions (JSONL), TensorBoard
scalars and ``results.md``, a table shaped like MM1's few-shot table (tasks x shots).

Scores are stored on their metrics' own scale (CIDEr-D as pycocoevalcap returns it, VQA
accuracy in [0, 1]); the table shows both x100, as MM1 and OpenFlamingo print them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Sequence

from mm1_megatron.evaluation.evaluator import ShotResult

logger = logging.getLogger(__name__)

METRIC_NAMES = {"cider": "CIDEr", "vqa_accuracy": "VQA acc."}


def results_document(results: Sequence[ShotResult], header: Dict) -> Dict:
    tasks: Dict[str, Dict] = {}
    for r in results:
        entry = tasks.setdefault(r.task, {"metric": r.metric, "shots": {}})
        entry["shots"][str(r.shots)] = {
            "score": r.score,
            "num_examples": r.num_examples,
            "seconds": round(r.seconds, 3),
        }
    return {**header, "tasks": tasks}


def markdown_table(results: Sequence[ShotResult], header: Dict) -> str:
    shots = sorted({r.shots for r in results})
    by_task: Dict[str, Dict[int, ShotResult]] = {}
    for r in results:
        by_task.setdefault(r.task, {})[r.shots] = r
    lines = [
        f"# Few-shot results: {header.get('checkpoint', '')} (step {header.get('step')})",
        "",
        f"Protocol {header['protocol']['version']}, seed {header['protocol']['seed']}, "
        f"demonstrations: {header['protocol']['demo_selection']}. Scores x100.",
        "",
        "| task | metric | " + " | ".join(f"{s}-shot" for s in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for task, row in by_task.items():
        metric = next(iter(row.values())).metric
        cells = [f"{100 * row[s].score:.1f}" if s in row else "-" for s in shots]
        lines.append(f"| {task} | {METRIC_NAMES[metric]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(
    results: List[ShotResult], header: Dict, output_dir: Path, *, tensorboard: bool, step: int
) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions = output_dir / "predictions"
    predictions.mkdir(exist_ok=True)
    for r in results:
        path = predictions / f"{r.task}_{r.shots}shot.jsonl"
        with path.open("w") as handle:
            for record in r.predictions:
                handle.write(json.dumps(record) + "\n")
    document = results_document(results, header)
    (output_dir / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    (output_dir / "results.md").write_text(markdown_table(results, header))
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard"))
        for r in results:
            writer.add_scalar(f"eval/{r.task}/{r.shots}shot", r.score, global_step=max(step, 0))
        writer.close()
    logger.info("results in %s", output_dir / "results.json")
    return output_dir / "results.json"
