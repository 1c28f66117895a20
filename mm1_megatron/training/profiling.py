"""Traces of chosen training steps (``logging.profile``; how to read them: docs/profiling.md).

``StepProfiler.step(n)`` wraps training step ``n``: the profiler starts before the first
traced step and stops after the last, on the ranks listed, and writes next to the run
(``<logging.output_dir>/profile/``):

- ``rank<r>_steps<a>-<b>.pt.trace.json``: torch.profiler's Chrome trace (CPU operators,
  CUDA kernels on GPU, memory events), each step under an ``mm1/train_step_<n>`` range;
- ``rank<r>_steps<a>-<b>.txt``: the operators' totals, the most expensive first;
- ``rank<r>_steps<a>-<b>_memory.pickle`` (``memory_snapshot``, GPU only): the CUDA
  caching allocator's history over the traced steps.

A run that stops inside the window (an error, preemption, the last step) still writes what
was traced (``close``). Profiling never stops training: a trace that cannot be written is
logged and skipped.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from mm1_megatron.config.schema import ProfileConfig

logger = logging.getLogger(__name__)

# Operators listed in the text summary.
SUMMARY_ROWS = 40
# Allocation events the CUDA allocator keeps for the memory snapshot.
MEMORY_HISTORY_ENTRIES = 100_000


class StepProfiler:
    def __init__(self, settings: ProfileConfig, output_dir: Path, rank: int):
        self.settings = settings
        self.first = settings.start_step
        self.last = settings.start_step + settings.num_steps - 1
        self.enabled = settings.start_step > 0 and rank in settings.ranks
        self.folder = Path(output_dir) / "profile"
        self.rank = rank
        self._profiler: Optional[torch.profiler.profile] = None
        self._memory = False
        self._traced_last = self.first - 1

    @contextlib.contextmanager
    def step(self, step: int):
        """Around training step ``step`` (counted from 1)."""
        if not self.enabled or not self.first <= step <= self.last:
            yield
            return
        if self._profiler is None:
            self._start()
        with torch.profiler.record_function(f"mm1/train_step_{step}"):
            yield
        self._traced_last = step
        if step == self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace, if one is running."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        try:
            self._write(profiler)
        except OSError as error:
            logger.warning("profile: could not write the trace to %s: %s", self.folder, error)
        finally:
            if self._memory:
                torch.cuda.memory._record_memory_history(enabled=None)
                self._memory = False

    def _start(self) -> None:
        settings = self.settings
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profiler = torch.profiler.profile(
            activities=activities,
            record_shapes=settings.record_shapes,
            profile_memory=True,
            with_stack=settings.with_stack,
        )
        self._profiler.__enter__()
        if settings.memory_snapshot:
            if torch.cuda.is_available():
                torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
                self._memory = True
            else:
                logger.warning("profile: memory_snapshot needs CUDA; this run traces without it")
        logger.info("profile: tracing steps %d-%d", self.first, self.last)

    def _write(self, profiler: torch.profiler.profile) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = f"rank{self.rank}_steps{self.first}-{self._traced_last}"
        trace = self.folder / f"{stem}.pt.trace.json"
        profiler.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=SUMMARY_ROWS)
        (self.folder / f"{stem}.txt").write_text(table + "\n")
        written = [trace.name, f"{stem}.txt"]
        if self._memory:
            snapshot = self.folder / f"{stem}_memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snapshot))
            written.append(snapshot.name)
        logger.info("profile: wrote %s in %s (docs/profiling.md)", ", ".join(written), self.folder)
