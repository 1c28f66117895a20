"""Video records (LLaVA-Video JSON + video files) -> conversation shards whose images are
the sampled frames, each after its time marker (``data/shards/video_records.py``), bad
records skipped by reason, and the training loader reading them as conversations."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm1_megatron.data.shards.reader import ShardReader, load_manifest
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.shards.video_records import clip_text, frame_marker, place_clip

av = pytest.importorskip("av")  # a dev dependency: installed by `make setup`
from tests.data.test_video_frames import _clip  # noqa: E402  (needs av)

REPO = Path(__file__).resolve().parents[2]
FRAMES = 3
ANSWER = "the picture gets lighter ."


def _turn(role, text):
    return {"from": role, "value": text}


def _record(video, question, answer=ANSWER):
    turns = [_turn("human", question), _turn("gpt", answer)]
    return {"id": video, "video": video, "conversations": turns}


def test_markers_replace_the_video_marker_or_lead_the_first_question():
    times = [0.5, 1.25, 2.0]
    clip = "time 0.5 : <image> time 1.2 : <image> time 2 : <image>"
    assert clip_text(times) == clip and frame_marker(12.04) == "time 12 :"
    for marker in ("<video>", "<image>"):  # LLaVA-Video writes <image>
        placed = place_clip(_record("v.mp4", f"{marker}\nwhat happens ?"), times)
        assert placed["conversations"][0]["value"] == f"{clip}\nwhat happens ?"
        assert placed["conversations"][1]["value"] == ANSWER and placed["video"] == "v.mp4"
    system_first = _record("v.mp4", "what happens ?")
    system_first["conversations"].insert(0, _turn("system", "be brief ."))
    placed = place_clip(system_first, times)
    assert placed["conversations"][1]["value"] == f"{clip}\nwhat happens ?"
    with pytest.raises(BadSample, match="2 <video> markers"):
        place_clip(_record("v.mp4", "<video> <video> what ?"), times)


def _corpus(tmp_path: Path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(_clip())  # 12 frames at 4 fps, frame i gray 20 * i
    (videos / "short.mp4").write_bytes(_clip(count=4))
    (videos / "bad.mp4").write_bytes(b"not a video at all" * 10)
    (videos / "empty.mp4").write_bytes(b"")
    records = [
        _record("a.mp4", "<video>\nwhat changes ?"),
        _record("short.mp4", "<image> describe it ."),
        _record("a.mp4", "what happens ?", "it gets lighter ."),
        _record("gone.mp4", "<video> what ?"),
        _record("bad.mp4", "<video> what ?"),
        _record("empty.mp4", "<video> what ?"),
        _record("a.mp4", "<video> and <video> ?"),
        {"id": "no_video", "conversations": [_turn("human", "hi"), _turn("gpt", "hi .")]},
    ]
    path = tmp_path / "video.json"
    path.write_text(json.dumps(records))
    return path, videos


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The corpus's shards and the build's counts."""
    from mm1_megatron.data.shards.video_records import video_conversation_items
    from mm1_megatron.data.shards.writer import build_shards

    tmp_path = tmp_path_factory.mktemp("video_shards")
    path, videos = _corpus(tmp_path)
    out = tmp_path / "shards"
    counts = build_shards(
        video_conversation_items(path, videos, num_frames=FRAMES),
        out,
        kind="conversation",
        samples_per_shard=2,
        input_id="test",
        progress=False,
    )
    return out, counts


def _samples(shards):
    manifest = load_manifest(shards, kind="conversation")
    reader = ShardReader()
    for path, size in zip(manifest.shard_paths, manifest.shard_sizes):
        for index in range(size):
            sample = reader.sample(path, index)
            record = json.loads(reader.read(path, sample.members["json"]))
            frames = [
                np.asarray(Image.open(io.BytesIO(reader.read(path, sample.members[name]))))
                for name in record["image"]
            ]
            yield record, frames


def _gray(frame: np.ndarray) -> float:
    return float(frame.astype(np.float64).mean())


def test_each_video_becomes_its_frames_after_their_time_markers(built):
    shards, counts = built
    samples = list(_samples(shards))
    assert [r["id"] for r, _ in samples] == ["a.mp4", "short.mp4", "a.mp4"]
    # 12 frames at 4 fps: 3 s in three 1 s spans, middles 0.5 / 1.5 / 2.5 s: frames
    # 2 / 6 / 10, grays 40 / 120 / 200 (the YUV and JPEG round trips move them a little).
    record, frames = samples[0]
    assert record["conversations"][0]["value"] == (
        "time 0.5 : <image> time 1.5 : <image> time 2.5 : <image>\nwhat changes ?"
    )
    assert [_gray(f) for f in frames] == pytest.approx([40, 120, 200], abs=3)
    # 4 frames at 4 fps (1 s): span middles 1/6, 1/2, 5/6 s take frames 1, 2, 3.
    record, frames = samples[1]
    assert record["conversations"][0]["value"].startswith("time 0.2 : <image> time 0.5 :")
    assert [_gray(f) for f in frames] == pytest.approx([20, 40, 60], abs=3)
    # A record without a marker gets the clip before its question.
    assert samples[2][0]["conversations"][0]["value"].endswith("<image>\nwhat happens ?")


def test_bad_records_are_skipped_and_counted(built):
    _, counts = built
    assert counts == {
        "written": 3,
        "missing_image": 1,  # the video: skip reasons are one fixed table
        "corrupt_image": 1,
        "empty_file": 1,
        "bad_record": 2,
        "shards": 2,
    }


def test_the_command_writes_the_shards(tmp_path, monkeypatch):
    from mm1_megatron.data import cli

    path, videos = _corpus(tmp_path)
    monkeypatch.setattr(cli, "setup_logging", lambda: None)  # keep pytest's logs
    out = tmp_path / "out"
    argv = ["shards", "videos", str(path), "--videos", str(videos), "--num-frames", "2",
            "--fps", "1", "--output", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    record, frames = next(_samples(out))
    # 3 s at 1 fps: 0.5 / 1.5 / 2.5 s, thinned evenly to two: the first and the last.
    assert record["conversations"][0]["value"].startswith("time 0.5 : <image> time 2.5 :")
    assert [_gray(f) for f in frames] == pytest.approx([40, 200], abs=3)
    assert cli.main([*argv[:-3], "--num-frames", "0", "--output", str(tmp_path / "x")]) == 2


def test_the_loader_reads_video_shards_as_conversations(built, tmp_path):
    from mm1_megatron.config import load_config
    from mm1_megatron.data.tokenizers.text import build_tokenizer, train_sentencepiece
    from tests.data.test_conversation_shards import _batch

    shards, _ = built
    # The markers' digits are not synthetic words: a small trained tokenizer reads them.
    texts = [f"time {t} : what changes ? {ANSWER} it gets lighter ." for t in range(10)]
    model = train_sentencepiece(texts * 20, tmp_path / "tok", vocab_size=64)
    tokenizer = ["data.tokenizer.kind=sentencepiece", f"data.tokenizer.path={model}"]
    batch, _ = _batch(shards, *tokenizer, "training.micro_batch_size=2")
    cfg = load_config(REPO / "configs/debug.yaml")
    tok = build_tokenizer("sentencepiece", str(model))
    per_image = cfg.model.connector.num_output_tokens
    for row in range(2):
        tokens = batch["tokens"][row].tolist()
        frames = tokens.count(tok.image_token_id) // per_image
        assert frames > 0 and frames % FRAMES == 0
        assert "time 0.5 :" in tok.decode([t for t in tokens if t != tok.image_token_id])
        labelled = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        assert tok.image_token_id not in labelled
        assert "lighter" in tok.decode(labelled)  # the answers are what is learned
    assert batch["images"].shape[0] == int(batch["num_images"].sum())


def test_a_resumed_build_decodes_no_video_its_finished_shards_cover(tmp_path, monkeypatch):
    from mm1_megatron.data.shards import video_records
    from mm1_megatron.data.shards.writer import build_shards

    path, videos = _corpus(tmp_path)
    decoded = []
    real = video_records.decode_frames

    def counting(source, **kwargs):
        decoded.append(Path(source).name)
        return real(source, **kwargs)

    monkeypatch.setattr(video_records, "decode_frames", counting)

    class Interrupted(Exception):
        pass

    def interrupted(items):  # stops when the third record is asked for
        for position, item in enumerate(items):
            if position == 2:
                raise Interrupted
            yield item

    partial_items = video_records.video_conversation_items(path, videos, num_frames=2)
    options = dict(kind="conversation", samples_per_shard=2, input_id="t", progress=False)
    with pytest.raises(Interrupted):
        build_shards(interrupted(partial_items), tmp_path / "out", **options)
    assert decoded == ["a.mp4", "short.mp4"]  # the first shard, finished
    decoded.clear()
    items = video_records.video_conversation_items(path, videos, num_frames=2)
    counts = build_shards(items, tmp_path / "out", **options)
    assert counts["written"] == 1  # the marker-less record; the rest are skips
    # Records 2..7: the videos that exist and are not empty are decoded, none before.
    assert decoded == ["a.mp4", "bad.mp4", "a.mp4"]
