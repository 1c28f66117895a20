"""Naming the slow ranks of a job (``logging.stragglers``; docs/profiling.md).

In synchronous training every rank's step takes as long as the slowest one's: the others
wait for it in a collective. So a step's wall time names no one; what differs is where
each rank spends it. Each rank times its step's phases:

- ``data_wait``: waiting for its loader;
- ``compute``: Megatron-Core's forward-backward schedule, less the gradient sync;
- ``gradient_sync``: ``finalize_model_grads`` (the data-parallel gradient reduction and
  the model-parallel sums): where a fast rank waits for a slow one;
- ``optimizer``: the optimizer step (its gradient-norm all-reduce and parameter
  all-gather wait too, so it is reported, not scored).

On a GPU each phase boundary waits for the kernels launched so far (a device sync,
only while ``interval > 0``), since host timers alone see launches, not kernels.

A rank's *own work* is ``data_wait + compute``. Every ``interval`` steps the ranks'
averages over the window are gathered on every rank (one small all-gather), and the
logging rank reports the ranks whose own work exceeds ``threshold`` times the median, the
slowest first, with their host and phases. Within a tensor- or pipeline-parallel group
ranks also wait for each other inside forward-backward (their collectives and the
pipeline's sends), which ``compute`` includes: a slow rank there slows its group's
compute, and the report names the group's ranks.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from mm1_megatron.config.schema import StragglerConfig
from mm1_megatron.parallel.collectives import all_gather_objects, all_gather_tensor

logger = logging.getLogger(__name__)

PHASES = ("data_wait", "compute", "gradient_sync", "optimizer")


class SlowRankDetector:
    def __init__(self, settings: StragglerConfig, rank: int):
        self.settings, self.rank = settings, rank
        self.enabled = settings.interval > 0
        self._window = dict.fromkeys(PHASES, 0.0)
        self._steps = 0
        self._hosts: Optional[List[str]] = None
        self.last_report: List[Dict] = []

    def add(self, phase: str, seconds: float) -> None:
        self._window[phase] += seconds

    def _settle(self) -> None:
        """On a GPU, wait for the kernels launched so far: host timers see launches, and
        a phase's kernels must be done before its end is read (one sync per boundary)."""
        if self.enabled and torch.cuda.is_available():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def timed(self, phase: str):
        self._settle()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._settle()
            self.add(phase, time.perf_counter() - start)

    def timed_gradient_sync(self, finalize: Callable) -> Callable:
        """``finalize_model_grads`` timed as ``gradient_sync`` (and kept out of compute)."""
        if not self.enabled:
            return finalize

        def finalize_timed(*args, **kwargs):
            self._settle()
            start = time.perf_counter()
            try:
                return finalize(*args, **kwargs)
            finally:
                self._settle()
                seconds = time.perf_counter() - start
                self.add("gradient_sync", seconds)
                self.add("compute", -seconds)  # it ran inside the schedule's timing

        return finalize_timed

    def end_step(self, step: int, *, report: bool) -> Dict[str, float]:
        """After each step; every ``interval`` steps, gather the window (every rank must
        call this) and, where ``report``, log the slow ranks. Returns metrics to log."""
        if not self.enabled:
            return {}
        self._steps += 1
        if step % self.settings.interval:
            return {}
        if self._hosts is None:
            self._hosts = all_gather_objects(socket.gethostname())
        averages = torch.tensor(
            [self._window[p] / self._steps for p in PHASES], dtype=torch.float64
        )
        table = all_gather_tensor(averages)  # [world, phases]
        self._window, self._steps = dict.fromkeys(PHASES, 0.0), 0
        return self._report(step, table) if report else {}

    def _report(self, step: int, table: torch.Tensor) -> Dict[str, float]:
        own = (table[:, PHASES.index("data_wait")] + table[:, PHASES.index("compute")]).tolist()
        median = statistics.median(own)
        ratios = [work / median if median > 0 else 1.0 for work in own]
        slowest = max(range(len(own)), key=lambda r: own[r])
        slow = sorted(
            (r for r, ratio in enumerate(ratios) if ratio > self.settings.threshold),
            key=lambda r: -own[r],
        )
        self.last_report = [
            {"rank": r, "host": self._hosts[r], "over_median": ratios[r]}
            | {phase: float(table[r, i]) for i, phase in enumerate(PHASES)}
            for r in slow[: self.settings.max_reported]
        ]
        if slow:
            logger.warning(
                "slow ranks over the last %d steps (own work = data wait + compute, median "
                "%.3f s): %s%s",
                self.settings.interval,
                median,
                "; ".join(_describe(entry) for entry in self.last_report),
                f" (and {len(slow) - len(self.last_report)} more)"
                if len(slow) > len(self.last_report)
                else "",
            )
        return {
            "stragglers/slowest_rank": float(slowest),
            "stragglers/slowest_over_median": ratios[slowest],
            "stragglers/num_slow_ranks": float(len(slow)),
        }


def _describe(entry: Dict) -> str:
    phases = ", ".join(f"{phase} {entry[phase]:.3f} s" for phase in PHASES)
    return f"rank {entry['rank']} on {entry['host']}: {entry['over_median']:.2f}x ({phases})"
