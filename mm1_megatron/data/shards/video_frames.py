"""Frames of a video file: which instants to sample, and decoding them with PyAV.

A video becomes ``num_frames`` frames (``data.video.num_frames``), each an image after its
time marker (``docs/video.md``). Without ``fps`` the frames are the middles of
``num_frames`` equal spans of the video; with ``fps`` they are taken at that rate (the
middle of each ``1 / fps`` span), evenly thinned to at most ``num_frames``. Each sampled
instant takes the decoded frame nearest to it.

PyAV is optional (``pip install -e .[video]``); asking for video frames without it fails
with that instruction.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np
import torch

VideoSource = Union[bytes, str, Path]


@dataclass(frozen=True)
class DecodedFrames:
    frames: List[torch.Tensor]  # uint8 [3, H, W] each, in time order
    times: List[float]  # seconds from the start of each returned frame
    duration: float  # the video's length in seconds


def sample_times(duration: float, *, num_frames: int, fps: Optional[float] = None) -> List[float]:
    """The instants (seconds) to take frames at; see the module docstring."""
    if duration <= 0:
        raise ValueError(f"a video of {duration} s has no frames to sample")
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames} must be >= 1")
    if fps is None:
        step = duration / num_frames
        return [(i + 0.5) * step for i in range(num_frames)]
    if fps <= 0:
        raise ValueError(f"fps={fps} must be > 0")
    count = max(1, int(duration * fps))
    times = [(i + 0.5) / fps for i in range(count)]
    if count <= num_frames:
        return times
    keep = np.linspace(0, count - 1, num_frames).round().astype(int)
    return [times[i] for i in keep]


def _require_av():
    try:
        import av
    except ImportError as exc:
        raise ValueError(
            "decoding video files needs PyAV: pip install -e .[video] (or pip install av)"
        ) from exc
    return av


def _open(av, source: VideoSource):
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        return av.open(handle)
    except Exception as exc:  # PyAV raises its own error types per FFmpeg failure
        raise ValueError(f"cannot open the video ({type(exc).__name__}: {exc})") from exc


def _frame_times(av, source: VideoSource) -> List[float]:
    """Every frame's time (one decoding pass, no pixels kept)."""
    times = []
    with _open(av, source) as container:
        for frame in _frames(container):
            times.append(float(frame.time))
    return times


def _frames(container):
    if not container.streams.video:
        raise ValueError("the file has no video stream")
    seen = False
    try:
        for frame in container.decode(container.streams.video[0]):
            if frame.time is not None:
                seen = True
                yield frame
    except ValueError:
        raise
    except Exception as exc:  # a damaged stream: keep what decoded before it, if anything
        if not seen:
            raise ValueError(f"the video does not decode ({type(exc).__name__}: {exc})") from exc


def decode_frames(
    source: VideoSource, *, num_frames: int, fps: Optional[float] = None
) -> DecodedFrames:
    """The frames nearest to ``sample_times`` of the video (a file path or its bytes).

    Two decoding passes: the frames' times, then the pixels of the chosen frames only
    (a long video never sits in memory). ``ValueError`` for a file that does not open,
    has no video stream or decodes no frame."""
    av = _require_av()
    starts = np.array(_frame_times(av, source))
    if starts.size == 0:
        raise ValueError("the video decodes to no frames")
    order = np.sort(starts)
    step = float(np.median(np.diff(order))) if order.size > 1 else 1.0
    duration = float(order[-1] - order[0] + step)
    wanted = [order[0] + t for t in sample_times(duration, num_frames=num_frames, fps=fps)]
    chosen = [float(order[np.abs(order - t).argmin()]) for t in wanted]
    pixels = {}
    with _open(av, source) as container:
        for frame in _frames(container):
            if float(frame.time) in chosen and float(frame.time) not in pixels:
                array = frame.to_ndarray(format="rgb24")
                pixels[float(frame.time)] = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    frames = [pixels[t] for t in chosen]
    return DecodedFrames(frames, [t - float(order[0]) for t in chosen], duration)
