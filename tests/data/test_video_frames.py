"""Video files through PyAV (``data/shards/video_frames.py``): which instants are
sampled (closed forms), and decoding a clip written here frame by frame (each frame a
distinct flat colour, so the frame a sample returns is known exactly)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from mm1_megatron.data.shards.video_frames import decode_frames, sample_times

av = pytest.importorskip("av")  # a dev dependency: installed by `make setup`

RATE = 4  # frames per second of the written clips
COUNT = 12  # 3 seconds


def _clip(count: int = COUNT, rate: int = RATE, size: int = 32) -> bytes:
    """An MPEG-4 clip whose frame i is a flat gray of level 20 * i."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for index in range(count):
            array = np.full((size, size, 3), 20 * index, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_sample_times_are_span_middles_or_a_thinned_rate():
    assert sample_times(8.0, num_frames=4) == [1.0, 3.0, 5.0, 7.0]
    assert sample_times(3.0, num_frames=8, fps=1) == [0.5, 1.5, 2.5]  # fewer than asked
    assert sample_times(10.0, num_frames=3, fps=1) == [0.5, 4.5, 9.5]  # thinned evenly
    assert sample_times(0.2, num_frames=4, fps=1) == [0.5]  # at least one
    with pytest.raises(ValueError, match="no frames"):
        sample_times(0.0, num_frames=4)
    with pytest.raises(ValueError, match="fps"):
        sample_times(1.0, num_frames=4, fps=0)


@pytest.mark.parametrize("num_frames, fps", [(4, None), (3, 1.0), (12, None)])
def test_decoded_frames_are_the_ones_nearest_to_the_sampled_instants(num_frames, fps):
    decoded = decode_frames(_clip(), num_frames=num_frames, fps=fps)
    assert decoded.duration == pytest.approx(COUNT / RATE)
    expected_times = sample_times(COUNT / RATE, num_frames=num_frames, fps=fps)
    assert len(decoded.frames) == len(expected_times)
    for frame, time, wanted in zip(decoded.frames, decoded.times, expected_times):
        index = round(time * RATE)
        assert abs(time - wanted) <= 0.5 / RATE + 1e-9  # the nearest frame
        assert frame.shape == (3, 32, 32) and str(frame.dtype) == "torch.uint8"
        # Lossy coding keeps a flat frame within a few levels of its gray.
        assert abs(float(frame.float().mean()) - 20 * index) < 4


def test_files_that_are_not_videos_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="cannot open the video"):
        decode_frames(b"not a video at all", num_frames=2)
    path = tmp_path / "clip.mp4"
    path.write_bytes(_clip())
    assert len(decode_frames(path, num_frames=2).frames) == 2
