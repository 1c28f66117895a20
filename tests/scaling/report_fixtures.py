"""Run folders for the ``mm1-report`` tests: the stored real runs (``fixtures/report_runs``,
written by ``make_report_fixtures.py``) and a sweep folder made of them, copies of them
damaged on purpose, and synthetic runs whose losses follow a chosen law exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional

from tests.conftest import DEBUG_CONFIG

STORED = Path(__file__).with_name("fixtures") / "report_runs"
RUN_NAMES = ["llm_h32_l2", "llm_h64_l2", "llm_h96_l3", "llm_h128_l4"]
GLOBAL_BATCH, SEQ_LENGTH = 8, 256  # configs/debug.yaml
SYNTHETIC_IMAGES, SYNTHETIC_PAIRS = 16, 60_000  # per step
SYNTHETIC_STEP_SECONDS, SYNTHETIC_PEAK = 0.5, 1e12


def sweep_entries() -> List[Dict]:
    return json.loads((STORED / "sweep.json").read_text())["runs"]


def make_sweep(root: Path) -> Path:
    """The stored runs laid out as a sweep: ``root/sweep.json`` and ``root/runs/<name>/``."""
    for name in RUN_NAMES:
        copy_run(name, root / "runs" / name)
    shutil.copy(STORED / "sweep.json", root / "sweep.json")
    return root


def read_jsonl(path: Path) -> List[Dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def copy_run(name: str, target: Path) -> Path:
    shutil.copytree(STORED / name, target)
    return target


def write_jsonl(path: Path, records: List[Dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def synthetic_config(hidden: int, layers: int, steps: int):
    from mm1_megatron.config import load_config

    return load_config(
        DEBUG_CONFIG,
        [
            f"model.llm.hidden_size={hidden}",
            f"model.llm.num_layers={layers}",
            f"model.llm.ffn_hidden_size={3 * hidden}",
            f"training.train_steps={steps}",
        ],
    )


def synthetic_step_flops(config) -> float:
    from mm1_megatron.training.flops import training_flops_per_step

    return training_flops_per_step(
        config.model,
        num_sequences=GLOBAL_BATCH,
        seq_length=SEQ_LENGTH,
        num_images=SYNTHETIC_IMAGES,
        attention_pairs=SYNTHETIC_PAIRS,
    )


def write_synthetic_run(
    folder: Path,
    *,
    hidden: int,
    layers: int,
    steps: int,
    loss_of_flops: Callable[[float], float],
    heldout_loss: Optional[float] = None,
) -> Path:
    """A finished run whose training loss at each step is ``loss_of_flops(C)`` of the
    FLOPs ``C`` spent so far (constant per step), with ``heldout_loss`` at the last step."""
    from mm1_megatron.config import save_config

    config = synthetic_config(hidden, layers, steps)
    folder.mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    per_step = synthetic_step_flops(config)
    records = []
    for step in range(1, steps + 1):
        achieved = per_step / SYNTHETIC_STEP_SECONDS
        records.append(
            {
                "step": step,
                "loss": loss_of_flops(step * per_step),
                "num_images": float(SYNTHETIC_IMAGES),
                "attention_pairs": float(SYNTHETIC_PAIRS),
                "num_text_tokens": 1000.0,
                "step_time_s": SYNTHETIC_STEP_SECONDS,
                "tflops_per_s_per_device": achieved / 1e12,
                "mfu": achieved / SYNTHETIC_PEAK,
            }
        )
    if heldout_loss is not None:
        records[-1]["heldout/loss"] = heldout_loss
    write_jsonl(folder / "metrics.jsonl", records)
    return folder


def write_tensorboard(folder: Path, records: List[Dict]) -> None:
    """``records`` as TensorBoard scalars, written the way ``SummaryWriter`` writes them."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder))
    for record in records:
        values = [
            summary_pb2.Summary.Value(tag=key, simple_value=float(value))
            for key, value in record.items()
            if key != "step" and value is not None
        ]
        summary = summary_pb2.Summary(value=values)
        writer.add_event(event_pb2.Event(step=record["step"], wall_time=0.0, summary=summary))
    writer.close()
