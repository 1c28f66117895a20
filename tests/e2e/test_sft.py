"""End-to-end SFT: ``configs/debug_sft.yaml`` starts from a pre-training checkpoint saved
at another layout (``mm1 train`` at TP=2 on the session's pool of two ranks), trains on
conversations with tiles and assistant-only loss, and a resumed SFT run continues from
its own checkpoint, not from the pre-training weights."""

from __future__ import annotations

import json
import math

import yaml

from tests.conftest import TINY_OVERRIDES
from tests.in_process import train_in_process
from tests.rank_pool import train_on_pool

SFT = (
    *TINY_OVERRIDES,
    "training.seq_length=128",
    "model.llm.max_sequence_length=128",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
)


def _rows(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_starts_from_pretrained_weights_and_trains_only_on_answers(tmp_path):
    pretrain = train_in_process(
        *TINY_OVERRIDES,
        "training.train_steps=2",
        f"checkpoint.save_dir={tmp_path / 'pre'}",
        f"logging.output_dir={tmp_path / 'pre_run'}",
        "logging.tensorboard=false",
    )
    assert pretrain.returncode == 0, pretrain.log[-4000:]

    sft_dir, sft_ckpt = tmp_path / "sft_run", tmp_path / "sft"
    common = (
        *SFT,
        f"checkpoint.initial_weights={tmp_path / 'pre'}",
        f"checkpoint.save_dir={sft_ckpt}",
        f"logging.output_dir={sft_dir}",
    )
    sft = train_on_pool(
        *common,
        "training.train_steps=3",
        "parallel.tensor_parallel_size=2",  # saved at TP=1
        config="configs/debug_sft.yaml",
        nproc=2,
    )
    assert sft.returncode == 0, sft.stderr[-4000:]
    assert f"of the model from {tmp_path / 'pre' / 'step_00000002'}" in sft.stderr
    rows = _rows(sft_dir)
    assert [row["step"] for row in rows] == [1, 2, 3]
    for row in rows:  # every sequence is a conversation: the loss is the answers' loss
        assert math.isfinite(row["loss/conversation"])
        assert row["loss/conversation"] == row["loss"]
        assert row["loss/caption"] is None
        assert row["num_images"] % 5 == 0  # four crops and an overview per image
    saved = yaml.safe_load((sft_dir / "config.yaml").read_text())
    assert saved["data"]["conversations"]["chat_template"]["version"] == "mm1-chat-1"
    assert saved["data"]["tiling"]["mode"] == "static"

    resumed = train_in_process(
        *common,
        "training.train_steps=4",
        "optimizer.schedule_on_resume=config",  # extends the 3-step run
        config="configs/debug_sft.yaml",
    )
    assert resumed.returncode == 0, resumed.log[-4000:]
    assert "of the model from" not in resumed.log  # its own checkpoint, not initial_weights
    assert [row["step"] for row in _rows(sft_dir)][-1] == 4
