"""DPO runs of ``mm1 train`` (in this process) from a pre-trained debug checkpoint, with
full weights (the reference a frozen copy) and with LoRA (the reference the model with
its adapters off):

- the first step's loss is log 2 (policy = reference: both start from the same weights);
- the reward margin (chosen minus rejected) grows over the run;
- a resumed run repeats the uninterrupted one bit for bit, which holds only if the
  resumed reference is the starting weights again, not the resumed policy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from tests.data.corpus_fixtures import image_bytes
from tests.in_process import train_in_process

STEPS = 12
DPO = [
    "training.objective=preference",
    "data.mixture={preference: 1.0}",
    "optimizer.warmup_steps=2",
    "logging.log_interval=1",
    "logging.tensorboard=false",
]
VARIANTS = {
    "full": ["optimizer.lr=0.0005"],
    "lora": ["optimizer.lr=0.003", "model.lora.rank=8"],
}


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _dpo(out: Path, name: str, base: Path, variant: str, *extra: str):
    result = train_in_process(
        *DPO,
        *VARIANTS[variant],
        f"training.train_steps={STEPS}",
        f"checkpoint.initial_weights={base}",
        f"logging.output_dir={out / name}",
        *extra,
    )
    assert result.returncode == 0, result.log[-3000:]
    return _metrics(out / name)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def dpo_run(request, reference, tmp_path_factory):
    variant = request.param
    out = tmp_path_factory.mktemp(f"dpo_{variant}")
    base = reference / "ckpt" / "step_00000006"
    metrics = _dpo(
        out,
        "full_run",
        base,
        variant,
        f"checkpoint.save_dir={out / 'ckpt'}",
        f"checkpoint.save_interval={STEPS // 2}",
    )
    return variant, out, base, metrics


def test_first_step_is_log_two_and_the_margin_grows(dpo_run):
    _, _, _, metrics = dpo_run
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[0]["dpo/reward_margin"] == pytest.approx(0, abs=1e-6)
    first = sum(m["dpo/reward_margin"] for m in metrics[:3]) / 3
    last = sum(m["dpo/reward_margin"] for m in metrics[-3:]) / 3
    assert last > first + 0.05, [round(m["dpo/reward_margin"], 3) for m in metrics]
    assert sum(m["loss"] for m in metrics[-3:]) / 3 < math.log(2)


def test_resume_repeats_the_run_bit_for_bit(dpo_run, tmp_path):
    variant, out, base, metrics = dpo_run
    half = f"step_{STEPS // 2:08d}"
    resumed = _dpo(tmp_path, "resumed", base, variant, f"checkpoint.load_dir={out / 'ckpt' / half}")
    assert [m["step"] for m in resumed] == list(range(STEPS // 2 + 1, STEPS + 1))
    full = {m["step"]: m for m in metrics}
    for m in resumed:
        assert m["loss"] == full[m["step"]]["loss"], m["step"]
        assert m["dpo/reward_margin"] == full[m["step"]]["dpo/reward_margin"], m["step"]


def test_dpo_from_preference_shards(reference, tmp_path):
    """``mm1 data shards preferences`` output as the DPO source: the first loss is log 2
    and training runs (the synthetic source above checks learning)."""
    from mm1_megatron.data import cli

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    entries = []
    for i in range(8):
        data, _ = image_bytes(rng, "PNG")
        (tmp_path / "images" / f"{i}.png").write_bytes(data)
        prompt = [{"from": "human", "value": "<image> is there a red circle ?"}]
        answers = ("yes .", "no .") if i % 2 else ("no .", "yes .")
        entries.append(
            {
                "image": f"{i}.png",
                "conversations": prompt,
                "chosen": answers[0],
                "rejected": answers[1],
            }
        )
    (tmp_path / "pairs.json").write_text(json.dumps(entries))
    shards = tmp_path / "shards"
    args = ["shards", "preferences", str(tmp_path / "pairs.json"), "--no-progress"]
    assert cli.main([*args, "--images", str(tmp_path / "images"), "--output", str(shards)]) == 0
    metrics = _dpo(
        tmp_path,
        "shards",
        reference / "ckpt" / "step_00000006",
        "full",
        "training.train_steps=3",
        "data.source=webdataset",
        f"data.shards.preference=[{shards}]",
        "data.num_workers=0",
    )
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(m["loss"]) and m["dpo/reward_accuracy"] >= 0 for m in metrics)
