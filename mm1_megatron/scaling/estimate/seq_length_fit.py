"""How many tokens per sequence fit at a layout: the longest ``training.seq_length`` whose
estimated peak memory per GPU is within the GPU's memory less the margin.

The length moves in steps the config validation accepts (``2 x CP`` chunks per sequence,
each rank's share split over TP with sequence parallelism:
``config.context_parallel_checks.context_parallel_token_multiple``; with an FP8 setting,
tokens per rank a multiple of 16: ``config.model_checks``), and
``model.llm.max_sequence_length`` is raised along with it (RoPE has no position table to
outgrow). Images per sequence follow the length as the workload sizes them
(``workload.max_images_per_sequence``: ``data.max_images_per_sequence``, and no more
than the tokens can hold), or stay at ``--images-per-sequence``. Peak memory grows with
the length, so a doubling search brackets the answer and bisection finds it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from mm1_megatron.config.context_parallel_checks import context_parallel_token_multiple
from mm1_megatron.config.model_checks import FP8_TOKEN_MULTIPLE, fp8_setting
from mm1_megatron.config.schema import MM1Config
from mm1_megatron.scaling.estimate.hardware import GIB, GpuType
from mm1_megatron.scaling.estimate.layouts import Layout
from mm1_megatron.scaling.estimate.memory import estimate_memory
from mm1_megatron.scaling.estimate.workload import default_workload

LONGEST_TRIED = 1 << 24  # tokens or frames: a search that still fits here stops, saying so


@dataclass(frozen=True)
class LengthFit:
    """The longest sequence that fits at ``layout`` (None: not even one step fits)."""

    layout: Layout
    seq_length: Optional[int]
    step: int  # the multiple the length moves in
    images_per_sequence: float  # at ``seq_length`` (frames per sequence will join these)
    peak_bytes: float  # at ``seq_length``
    next_peak_bytes: float  # at ``seq_length + step``: over the usable memory
    usable_bytes: float

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.to_dict(),
            "max_seq_length": self.seq_length,
            "step": self.step,
            "images_per_sequence": self.images_per_sequence,
            "peak_memory_bytes": self.peak_bytes,
            "next_step_peak_memory_bytes": self.next_peak_bytes,
            "usable_memory_bytes": self.usable_bytes,
        }

    def describe(self) -> str:
        where = self.layout.describe()
        if self.seq_length is None:
            return (
                f"{where}: not even {self.step} tokens fit ({self.next_peak_bytes / GIB:.1f} "
                f"GiB of {self.usable_bytes / GIB:.1f} GiB usable)"
            )
        more = self.seq_length + self.step
        return (
            f"{where}: {self.seq_length} tokens, {self.images_per_sequence:g} images per "
            f"sequence, peak {self.peak_bytes / GIB:.1f} GiB of {self.usable_bytes / GIB:.1f} "
            f"GiB usable ({more} tokens: {self.next_peak_bytes / GIB:.1f} GiB)"
        )


def at_seq_length(cfg: MM1Config, seq_length: int) -> MM1Config:
    """A copy of ``cfg`` training on ``seq_length`` tokens, ``max_sequence_length`` raised."""
    out = copy.deepcopy(cfg)
    out.training.seq_length = seq_length
    out.model.llm.max_sequence_length = max(out.model.llm.max_sequence_length, seq_length)
    return out


def length_step(cfg: MM1Config) -> int:
    """The multiple ``training.seq_length`` must be at ``cfg``'s layout (see the module
    docstring)."""
    step = context_parallel_token_multiple(cfg)
    if fp8_setting(cfg) is not None:
        par = cfg.parallel
        fp8 = FP8_TOKEN_MULTIPLE * (par.tensor_parallel_size if par.sequence_parallel else 1)
        step = math.lcm(step, fp8 // math.gcd(fp8, cfg.training.micro_batch_size))
    return step


def max_seq_length(
    cfg: MM1Config,
    layout: Layout,
    *,
    num_gpus: int,
    gpu: GpuType,
    memory_margin: float,
    images_per_sequence: Optional[float] = None,
) -> LengthFit:
    """The longest ``training.seq_length`` whose estimate for ``cfg`` (already at
    ``layout``) fits on ``num_gpus`` x ``gpu``."""
    usable = gpu.memory_bytes * (1 - memory_margin)
    step = length_step(cfg)

    def measure(steps: int):
        candidate = at_seq_length(cfg, steps * step)
        workload = default_workload(candidate, images_per_sequence)
        peak = estimate_memory(candidate, workload, num_gpus=num_gpus).peak
        return peak, workload.images_per_sequence

    peaks = {}

    def fits(steps: int) -> bool:
        peaks[steps] = measure(steps)
        return peaks[steps][0] <= usable

    low, high = largest_fitting(fits, step, "tokens", "--max-seq-length", layout)
    if low == 0:
        return LengthFit(layout, None, step, peaks[1][1], 0.0, peaks[1][0], usable)
    (peak, images), (next_peak, _) = peaks[low], peaks[high]
    return LengthFit(layout, low * step, step, images, peak, next_peak, usable)


def largest_fitting(
    fits: Callable[[int], bool], step: int, unit: str, flag: str, layout: Layout
) -> Tuple[int, int]:
    """``(low, high)``: ``fits(low)`` and not ``fits(high)``, ``high == low + 1``, for a
    ``fits`` true up to some count of steps and false beyond; ``(0, 1)`` when not even
    one step fits. A doubling search brackets the answer, bisection finds it."""
    if not fits(1):
        return 0, 1
    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
        if high * step > LONGEST_TRIED:
            raise ValueError(
                f"{flag}: {low * step} {unit} still fit at {layout.describe()}; the search "
                f"stops at {LONGEST_TRIED} (check --memory-margin and the config)"
            )
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low, high


def describe_fits(fits: List[LengthFit], gpu: GpuType, margin: float) -> List[str]:
    lines = [
        f"Longest training.seq_length that fits on {gpu.name} ({margin:.0%} of memory kept "
        "free; images per sequence follow the length, model.llm.max_sequence_length raised "
        "with it):"
    ]
    return lines + [f"  {fit.describe()}" for fit in fits]
