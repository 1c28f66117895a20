"""The files of a training run's output folder, as the report reads them.

- ``config.yaml``: the resolved config the trainer saves (model shape, batch, steps).
- ``metrics.jsonl``: one JSON object per step (``training/metrics.py``). A resumed run
  appends, so a step may appear twice: the later record wins. A line that does not parse
  (a run killed mid-write, then resumed onto the same line) is skipped and counted.
- ``tensorboard/``: the same scalars; read only when ``metrics.jsonl`` is missing.
- ``results.json`` of ``mm1 eval`` (``evaluation/report.py``), in the run folder or one
  folder below it (e.g. ``eval/results.json``): the one of the latest step is used.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from mm1_megatron.config import MM1Config, config_from_dict
from mm1_megatron.config.safe_yaml import parse_yaml

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
EVAL_RESULTS_FILE = "results.json"

# The per-step fields the report reads, besides few-shot scores (``eval/<task>/<k>shot``).
READ_FIELDS = (
    "step",
    "loss",
    "heldout/loss",
    "num_images",
    "attention_pairs",
    "num_text_tokens",
    "step_time_s",
    "tflops_per_s_per_device",
    "mfu",
)
SCORE_KEY = re.compile(r"^eval/(?P<task>.+)/(?P<shots>\d+)shot$")


def keep_read_fields(record: Dict) -> Dict:
    """``record`` without the fields the report does not read (for small test fixtures)."""
    return {k: v for k, v in record.items() if k in READ_FIELDS or SCORE_KEY.match(k)}


def finite(value) -> Optional[float]:
    """``value`` as a float, or None when it is missing, not a number, or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_config(folder: Path) -> MM1Config:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"run folder {folder}: no {CONFIG_FILE} (the trainer saves it first)")
    try:
        tree = parse_yaml(path.read_text(), str(path))
        return config_from_dict(tree)
    except (ValueError, TypeError) as exc:
        message = f"run folder {folder}: {CONFIG_FILE} is not a readable config: {exc}"
        raise ValueError(message) from exc


def read_metrics_jsonl(path: Path) -> Tuple[List[Dict], int]:
    """Per-step records sorted by step (the last record of a repeated step wins), and the
    number of lines skipped because they do not parse as a record with an integer step."""
    by_step: Dict[int, Dict] = {}
    num_bad = 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            num_bad += 1
            logger.warning("%s:%d: not a metrics record, skipped", path, number)
            continue
        by_step[step] = record
    return [by_step[step] for step in sorted(by_step)], num_bad


def read_tensorboard(folder: Path) -> List[Dict]:
    """Per-step records from the scalars of every event file under ``folder``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    by_step: Dict[int, Dict] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor"):
                    number = float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])
                else:
                    continue
                by_step.setdefault(int(event.step), {"step": int(event.step)})[value.tag] = number
    return [by_step[step] for step in sorted(by_step)]


def read_step_records(folder: Path) -> Tuple[List[Dict], int, str]:
    """The run's per-step records, the count of skipped lines, and where they came from
    (``metrics.jsonl``, ``tensorboard`` or ``""`` when the run logged nothing)."""
    metrics = folder / METRICS_FILE
    if metrics.is_file():
        records, num_bad = read_metrics_jsonl(metrics)
        return records, num_bad, METRICS_FILE
    events = folder / TENSORBOARD_DIR
    if events.is_dir() and any(events.rglob("events.out.tfevents.*")):
        return read_tensorboard(events), 0, TENSORBOARD_DIR
    return [], 0, ""


def scores_from_record(record: Dict) -> Dict[str, float]:
    """``{"<task>/<k>shot": score}`` of the few-shot scores logged in one step's record."""
    scores = {}
    for key, value in record.items():
        match = SCORE_KEY.match(key)
        if match and finite(value) is not None:
            scores[f"{match['task']}/{match['shots']}shot"] = float(value)
    return scores


def _scores_from_results(path: Path) -> Tuple[int, Dict[str, float]]:
    try:
        document = json.loads(path.read_text())
        step = int(document.get("step") or 0)
        scores = {
            f"{task}/{shots}shot": float(entry["score"])
            for task, body in document["tasks"].items()
            for shots, entry in body["shots"].items()
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        logger.warning("%s: not an mm1 eval results file (%s), skipped", path, exc)
        return -1, {}
    return step, scores


def read_eval_results(folder: Path) -> Tuple[Optional[Path], int, Dict[str, float]]:
    """The latest-step ``results.json`` in ``folder`` or a folder below it: its path, the
    checkpoint step it evaluated and its scores (``None, -1, {}`` when there is none)."""
    candidates = [folder / EVAL_RESULTS_FILE, *sorted(folder.glob(f"*/{EVAL_RESULTS_FILE}"))]
    best: Tuple[int, Optional[Path], Dict[str, float]] = (-1, None, {})
    for path in candidates:
        if path.is_file():
            step, scores = _scores_from_results(path)
            if scores and step >= best[0]:
                best = (step, path, scores)
    return best[1], best[0], best[2]
