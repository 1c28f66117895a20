"""Console progress and TensorBoard scalars, written by one rank."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger("mm1_megatron.train")


def _format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_bar(step: int, total: int, width: int = 20) -> str:
    filled = int(width * step / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {step}/{total}"


class MetricsLogger:
    """Logs every ``log_interval`` steps; a no-op on ranks other than the logging rank."""

    def __init__(
        self,
        output_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        log_interval: int,
        tensorboard: bool,
        progress_bar: bool,
        append: bool = False,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.show_progress = progress_bar
        self.start_time = time.monotonic()
        self.writer = None
        self.jsonl = None
        if enabled:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            # One JSON object per step: easy to diff and plot across runs of a study.
            # A resumed run appends to the curve it continues.
            self.jsonl = open(
                Path(output_dir) / "metrics.jsonl", "a" if append else "w", encoding="utf-8"
            )
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {
            name: None if isinstance(value, float) and math.isnan(value) else value
            for name, value in scalars.items()
        }
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for name, value in scalars.items():
                if value is not None and not math.isnan(value):
                    self.writer.add_scalar(name, value, step)
        if step % self.log_interval == 0 or step == self.total_steps:
            logger.info(self._console_line(step, scalars))

    def _console_line(self, step: int, scalars: Dict[str, float]) -> str:
        elapsed = time.monotonic() - self.start_time
        eta = elapsed / max(step, 1) * (self.total_steps - step)
        head = progress_bar(step, self.total_steps) if self.show_progress else f"step {step}"
        shown = ["loss", "lr", "grad_norm", "tokens_per_s", "images_per_s", "mfu"]
        parts = [
            f"{name} {scalars[name]:.4g}"
            for name in shown
            if name in scalars and scalars[name] is not None and not math.isnan(scalars[name])
        ]
        return f"{head} | " + " | ".join(parts) + f" | eta {_format_seconds(eta)}"

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None
