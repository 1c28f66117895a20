"""How many video frames fit in one training sequence at a layout (``mm1 estimate
--max-frames``).

A video enters the model as its frames (docs/video.md): each frame is one image (a tile
when tiling is on) of ``model.connector.num_output_tokens`` tokens after a frame-time
marker (``time two :``, ``MARKER_TOKENS`` tokens), then the video's text
(``--video-text-tokens``: the question and answer). A sequence of ``F`` frames is
``F x (tokens per frame + markers) + text`` tokens, rounded up to the multiple the layout
needs (``seq_length_fit.length_step``), with ``F`` images for the vision encoder, one
document. The answer is the most frames whose estimated peak memory per GPU is within the
GPU's memory less the margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.scaling.estimate.hardware import GIB, GpuType
from mm1_megatron.scaling.estimate.layouts import Layout
from mm1_megatron.scaling.estimate.memory import estimate_memory
from mm1_megatron.scaling.estimate.seq_length_fit import (
    at_seq_length,
    largest_fitting,
    length_step,
)
from mm1_megatron.scaling.estimate.workload import default_workload

MARKER_TOKENS = 3  # "time two :" in the synthetic vocabulary, one token per word
DEFAULT_TEXT_TOKENS = 64


@dataclass(frozen=True)
class FramesFit:
    """The most frames per sequence at ``layout`` (None: not even one fits)."""

    layout: Layout
    frames: Optional[int]
    seq_length: Optional[int]  # the sequence ``frames`` make, rounded up to the step
    tokens_per_frame: int  # the connector's tokens and the time marker
    peak_bytes: float  # at ``frames``
    next_peak_bytes: float  # at ``frames + 1``: over the usable memory
    usable_bytes: float

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.to_dict(),
            "max_frames": self.frames,
            "seq_length": self.seq_length,
            "tokens_per_frame": self.tokens_per_frame,
            "peak_memory_bytes": self.peak_bytes,
            "next_frame_peak_memory_bytes": self.next_peak_bytes,
            "usable_memory_bytes": self.usable_bytes,
        }

    def describe(self) -> str:
        where = self.layout.describe()
        if self.frames is None:
            return (
                f"{where}: not even one frame fits ({self.next_peak_bytes / GIB:.1f} GiB of "
                f"{self.usable_bytes / GIB:.1f} GiB usable)"
            )
        return (
            f"{where}: {self.frames} frames ({self.seq_length} tokens), peak "
            f"{self.peak_bytes / GIB:.1f} GiB of {self.usable_bytes / GIB:.1f} GiB usable "
            f"({self.frames + 1} frames: {self.next_peak_bytes / GIB:.1f} GiB)"
        )


def video_seq_length(cfg: MM1Config, frames: int, text_tokens: int) -> int:
    """The tokens of one video of ``frames`` frames and its text, rounded up to the
    multiple ``training.seq_length`` must be at ``cfg``'s layout."""
    tokens = frames * (cfg.model.connector.num_output_tokens + MARKER_TOKENS) + text_tokens
    step = length_step(cfg)
    return -(-tokens // step) * step


def max_frames(
    cfg: MM1Config,
    layout: Layout,
    *,
    num_gpus: int,
    gpu: GpuType,
    memory_margin: float,
    text_tokens: int = DEFAULT_TEXT_TOKENS,
) -> FramesFit:
    """The most frames per sequence whose estimate for ``cfg`` (already at ``layout``)
    fits on ``num_gpus`` x ``gpu``."""
    if text_tokens < 0:
        raise ValueError(f"--video-text-tokens={text_tokens} must be >= 0")
    usable = gpu.memory_bytes * (1 - memory_margin)
    peaks = {}

    def fits(frames: int) -> bool:
        candidate = at_seq_length(cfg, video_seq_length(cfg, frames, text_tokens))
        workload = default_workload(candidate, images_per_sequence=frames)
        peaks[frames] = estimate_memory(candidate, workload, num_gpus=num_gpus).peak
        return peaks[frames] <= usable

    per_frame = cfg.model.connector.num_output_tokens + MARKER_TOKENS
    low, high = largest_fitting(fits, per_frame, "frames' tokens", "--max-frames", layout)
    if low == 0:
        return FramesFit(layout, None, None, per_frame, 0.0, peaks[1], usable)
    length = video_seq_length(cfg, low, text_tokens)
    return FramesFit(layout, low, length, per_frame, peaks[low], peaks[high], usable)


def describe_frame_fits(
    fits: List[FramesFit], gpu: GpuType, margin: float, text_tokens: int
) -> List[str]:
    first = fits[0]
    lines = [
        f"Most video frames per sequence that fit on {gpu.name} ({margin:.0%} of memory "
        f"kept free; each frame {first.tokens_per_frame} tokens with its time marker, "
        f"{text_tokens} text tokens, one video per sequence):"
    ]
    return lines + [f"  {fit.describe()}" for fit in fits]
