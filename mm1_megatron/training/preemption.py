"""Graceful stop on SIGTERM / SIGUSR1 (SLURM preemption and time limits).

The handler only records the request; the training loop checks it between steps, agrees
on it across ranks (any rank's signal stops all), writes a checkpoint synchronously and
exits with ``EXIT_PREEMPTED`` so a scheduler can requeue the job.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Optional

from mm1_megatron.parallel.collectives import all_reduce_values

logger = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; requeue on this code
EXIT_DIVERGED = 3  # stopped after too many non-finite losses
EXIT_CONFIG_ERROR = 2
EXIT_STOPPED_UNSAVED = 4  # stopped by a signal without checkpoint.save_dir: do not requeue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

# A launcher that cannot see the workers' exit codes (torchrun reports any worker failure
# as 1) names a file here; rank 0 writes it after the preemption checkpoint.
PREEMPTION_MARKER_ENV = "MM1_PREEMPTION_MARKER"


def write_preemption_marker(step: int, checkpoint_dir: Optional[str]) -> Optional[Path]:
    """Write ``$MM1_PREEMPTION_MARKER`` (JSON: step, checkpoint folder), atomically."""
    target = os.environ.get(PREEMPTION_MARKER_ENV)
    if not target:
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"step": step, "checkpoint_dir": checkpoint_dir}))
    partial.replace(path)
    logger.info("preemption marker written: %s", path)
    return path


class Preempted(Exception):
    """Raised after the preemption checkpoint is written."""


class StoppedWithoutCheckpoint(Exception):
    """A stop signal arrived but there is nowhere to save: the run cannot resume."""


class TrainingDiverged(RuntimeError):
    """Raised when the loss was non-finite on too many steps."""


class PreemptionHandler:
    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            logger.warning(
                "received %s: will checkpoint after this step and exit with %d",
                signal.Signals(signum).name,
                EXIT_PREEMPTED,
            )
        self.received = signum

    def stop_requested(self) -> bool:
        """True on every rank if any rank received a stop signal (collective)."""
        (flag,) = all_reduce_values([1.0 if self.received is not None else 0.0], op="max")
        return flag > 0

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
