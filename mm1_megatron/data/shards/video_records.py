"""LLaVA-Video-style records as conversation samples whose images are the video's frames.

    [{"id": "v1", "video": "clips/v1.mp4", "conversations": [
        {"from": "human", "value": "<video>\\nWhat happens in the video?"},
        {"from": "gpt", "value": "A red ball rolls off the table."}]}, ...]

``mm1 data shards videos`` decodes each video once, when its sample is written
(``data/shards/video_frames.py``: ``num_frames`` frames at the middles of equal spans,
or at ``fps`` thinned to ``num_frames``), and stores every frame as a JPEG member. The
record's video marker (``<video>``, or ``<image>`` as LLaVA-Video writes it; without one
the clip goes before the first human turn's text) becomes one time marker and one image
marker per frame::

    time 0.5 : <image> time 1.5 : <image> time 2.5 : <image> ...

(seconds from the video's start, to a tenth, ``frame_marker``). What is written is a
``conversation`` record: training reads it through ``data.mixture.conversation`` like
any multi-image conversation (packing, chat template, loss on the answers only).
A video that is missing, empty or does not decode skips its record, counted as a missing,
empty or corrupt image would be (``missing_image``, ``empty_file``, ``corrupt_image``: the
skip reasons are a fixed table, ``shards/skips.py``), the message naming the video.
"""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Union

from mm1_megatron.data.shards.conversations import IMAGE_MARKER
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.shards.video_frames import decode_frames
from mm1_megatron.data.shards.writer import ConversationItem, EncodedImage, LazyItem

VIDEO_MARKER = "<video>"
JPEG_QUALITY = 95


def frame_marker(seconds: float) -> str:
    """``time 1.5 :``: what stands before a frame taken ``seconds`` into the video."""
    return f"time {round(seconds, 1):g} :"


def clip_text(times: List[float]) -> str:
    """The markers and image markers of a clip whose frames are at ``times``."""
    return " ".join(f"{frame_marker(t)} {IMAGE_MARKER}" for t in times)


def place_clip(record: Mapping[str, Any], times: List[float]) -> Dict[str, Any]:
    """``record`` with its video marker replaced by the clip's markers (see the module
    docstring); ``BadSample`` for a record that is not a conversation with one video."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadSample("bad_record", "no 'conversations' list")
    texts = [t.get("value") if isinstance(t, Mapping) else None for t in turns]
    if not all(isinstance(text, str) for text in texts):
        raise BadSample("bad_record", "every turn needs a text 'value'")
    marker = VIDEO_MARKER if any(VIDEO_MARKER in text for text in texts) else IMAGE_MARKER
    count = sum(text.count(marker) for text in texts)
    if count > 1:
        raise BadSample("bad_record", f"{count} {marker} markers: a video record has one clip")
    clip = clip_text(times)
    if count == 1:
        texts = [text.replace(marker, clip) for text in texts]
    else:
        first_human = next((i for i, t in enumerate(turns) if t.get("from") == "human"), 0)
        texts[first_human] = f"{clip}\n{texts[first_human]}"
    return {**record, "conversations": [{**t, "value": x} for t, x in zip(turns, texts)]}


def _jpeg(frame) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def video_item(
    record: Mapping[str, Any], root: Path, *, num_frames: int, fps: Optional[float]
) -> ConversationItem:
    """The conversation sample of one video record (decodes the video)."""
    name = record.get("video")
    if not isinstance(name, str) or not name:
        raise BadSample("bad_record", "no 'video' file name")
    path = root / name
    if not path.is_file():
        raise BadSample("missing_image", f"video {name} not found")
    if path.stat().st_size == 0:
        raise BadSample("empty_file", f"video {path} is empty")
    try:
        decoded = decode_frames(path, num_frames=num_frames, fps=fps)
    except ValueError as exc:
        raise BadSample("corrupt_image", f"video {path}: {exc}") from exc
    placed = place_clip(record, decoded.times)
    frames = tuple(
        EncodedImage(_jpeg(frame), f"{name}@{t:.2f}s", "jpg")
        for frame, t in zip(decoded.frames, decoded.times)
    )
    return ConversationItem(placed, frames)


def video_conversation_items(
    json_path: Union[str, Path],
    video_root: Union[str, Path],
    *,
    num_frames: int,
    fps: Optional[float] = None,
) -> Iterator[LazyItem]:
    """One lazily decoded item per record of a LLaVA-Video JSON list."""
    if num_frames < 1:
        raise ValueError(f"--num-frames={num_frames} must be >= 1")
    if fps is not None and fps <= 0:
        raise ValueError(f"--fps={fps} must be > 0")
    try:
        data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read JSON file {json_path}: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{json_path} is not a LLaVA-Video file (a JSON list of records)")
    root = Path(video_root)
    for record in data:
        if not isinstance(record, dict):
            record = {}  # skipped as a bad record when written
        yield LazyItem(partial(video_item, record, root, num_frames=num_frames, fps=fps))
