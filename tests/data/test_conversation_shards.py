"""Conversation shards: LLaVA instruction JSON -> shards (bad entries skipped with their
reason) -> the training loader, where exactly the answers carry labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mm1_megatron.data.shards.ingest import llava_conversation_items
from mm1_megatron.data.shards.reader import ShardReader, load_manifest
from mm1_megatron.data.shards.writer import build_shards
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.data.corpus_fixtures import image_bytes

REPO = Path(__file__).resolve().parents[2]
TOK = SyntheticTokenizer()
ANSWERS = ["there are two shapes .", "yes .", "a red circle .", "at the top left .", "no ."]


def _turn(role, text):
    return {"from": role, "value": text}


def _corpus(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        data, _ = image_bytes(rng, "PNG" if name.endswith("png") else "JPEG")
        (images / name).write_bytes(data)
    good = [
        {"id": "one", "image": "a.jpg", "conversations": [
            _turn("human", "<image>\nhow many shapes ?"), _turn("gpt", ANSWERS[0]),
            _turn("human", "is there a red circle ?"), _turn("gpt", ANSWERS[1])]},
        {"id": "text", "conversations": [
            _turn("system", "describe the picture ."),
            _turn("human", "what is at the top left ?"), _turn("gpt", ANSWERS[2])]},
        {"id": "two", "image": ["b.png", "c.jpg"], "conversations": [
            _turn("human", "<image> where is the red circle ?"), _turn("gpt", ANSWERS[3]),
            _turn("human", "<image> is there a blue square ?"), _turn("gpt", ANSWERS[4])]},
    ]  # fmt: skip
    bad = [
        {"id": "no_answer", "image": "a.jpg", "conversations": [_turn("human", "<image> what ?")]},
        {"id": "robot", "conversations": [_turn("robot", "hi"), _turn("gpt", "no .")]},
        {"id": "markers", "image": ["a.jpg", "b.png"], "conversations": [
            _turn("human", "<image> what ?"), _turn("gpt", "no .")]},
        {"id": "missing", "image": "gone.jpg", "conversations": [
            _turn("human", "<image> what ?"), _turn("gpt", "no .")]},
    ]  # fmt: skip
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(good + bad))
    return path, images


def test_llava_conversations_become_shards_and_bad_entries_are_counted(tmp_path):
    path, images = _corpus(tmp_path)
    counts = build_shards(
        llava_conversation_items(path, images),
        tmp_path / "shards",
        kind="conversation",
        samples_per_shard=2,
        input_id="test",
        verify_images=True,
        progress=False,
    )
    assert counts == {"written": 3, "bad_record": 3, "missing_image": 1, "shards": 2}
    manifest = load_manifest(tmp_path / "shards", kind="conversation")
    reader = ShardReader()
    first = reader.sample(manifest.shard_paths[0], 0)
    record = json.loads(reader.read(manifest.shard_paths[0], first.members["json"]))
    assert record["id"] == "one" and record["image"] == ["0.jpg"]
    assert sorted(first.members) == ["0.jpg", "json"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mm1_megatron.data import cli

    tmp_path = tmp_path_factory.mktemp("conversation_shards")
    path, images = _corpus(tmp_path)
    out = tmp_path / "shards"
    setup_logging, cli.setup_logging = cli.setup_logging, lambda: None  # keep pytest's logs
    try:
        code = cli.main(
            ["shards", "conversations", str(path), "--images", str(images),
             "--output", str(out), "--no-progress"]
        )  # fmt: skip
    finally:
        cli.setup_logging = setup_logging
    assert code == 0
    return out


def _batch(shards, *overrides):
    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.data.build import build_run_data

    cfg = validate_config(
        load_config(
            REPO / "configs/debug.yaml",
            [
                "data.source=webdataset",
                "data.mixture={conversation: 1.0}",
                f"data.shards.conversation=[{shards}]",
                *overrides,
            ],
        )
    )
    loader, _ = build_run_data(cfg)
    return next(iter(loader)), loader


def test_the_loader_labels_exactly_the_answers(shards):
    batch, _ = _batch(shards, "training.micro_batch_size=2")
    conversations = [ANSWERS[0:2], ANSWERS[2:3], ANSWERS[3:5]]  # each one's answers
    for row in range(batch["tokens"].shape[0]):
        labelled = batch["labels"][row][batch["loss_mask"][row].bool()].tolist()
        answers = [a.strip() for a in TOK.decode(labelled).split("<end_turn>")]
        assert answers.pop() == "", "the last label is an end-of-turn"
        # The labelled tokens are whole conversations' answers, each in its own order.
        while answers:
            match = [c for c in conversations if answers[: len(c)] == c]
            assert match, answers
            answers = answers[len(match[0]) :]


def test_an_overlong_conversation_is_shortened_at_a_turn_and_counted(shards):
    # 32 tokens: the two-image conversation (37 tokens with its 2 x 4 image tokens) does not fit
    # whole; one per sequence, so every sequence is one conversation.
    from mm1_megatron.data.pipeline.loader import stats_vector
    from mm1_megatron.data.shards.skips import STAT_NAMES

    batch, loader = _batch(
        shards,
        "training.seq_length=32",
        "data.conversations.packing=one_per_sequence",
        "training.micro_batch_size=8",
    )
    counts = dict(zip(STAT_NAMES, stats_vector(loader)))
    assert counts["shortened_conversations"] >= 1
    for row in range(batch["tokens"].shape[0]):
        assert int(batch["document_ids"][row][: int(batch["num_real_tokens"][row])].max()) == 0
