"""Loss health: skip non-finite steps (and stop after too many), log loss spikes."""

from __future__ import annotations

import collections
import logging
import math

from mm1_megatron.training.preemption import TrainingDiverged

logger = logging.getLogger(__name__)

SPIKE_WINDOW = 20
MIN_HISTORY_FOR_SPIKES = 5


class LossMonitor:
    def __init__(self, *, max_nonfinite_steps: int, spike_ratio: float):
        self.max_nonfinite_steps = max_nonfinite_steps
        self.spike_ratio = spike_ratio
        self.num_nonfinite_steps = 0
        self.recent = collections.deque(maxlen=SPIKE_WINDOW)

    def record_nonfinite(self, step: int) -> None:
        """Count a skipped step; raise ``TrainingDiverged`` once there are too many."""
        self.num_nonfinite_steps += 1
        logger.error(
            "step %d: loss is NaN or Inf; the update was skipped (%d of at most %d)",
            step,
            self.num_nonfinite_steps,
            self.max_nonfinite_steps,
        )
        if self.num_nonfinite_steps >= self.max_nonfinite_steps:
            raise TrainingDiverged(
                f"stopping: {self.num_nonfinite_steps} steps had a NaN/Inf loss (limit "
                f"training.max_nonfinite_steps={self.max_nonfinite_steps}); resume from the last "
                f"checkpoint with a lower learning rate or inspect the data around step {step}"
            )

    def is_spike(self, step: int, loss: float) -> bool:
        """True (and a warning) when ``loss`` exceeds ``spike_ratio`` x the recent mean."""
        spike = False
        if len(self.recent) >= MIN_HISTORY_FOR_SPIKES and math.isfinite(loss):
            mean = sum(self.recent) / len(self.recent)
            spike = loss > self.spike_ratio * mean
            if spike:
                logger.warning("step %d: loss spike %.4g (recent mean %.4g)", step, loss, mean)
        if math.isfinite(loss):
            self.recent.append(loss)
        return spike
