"""Few-shot evaluation of a native-resolution model (SigLIP 2 NaFlex): scores logged during
training (``eval.tasks``) and ``mm1 eval`` on its checkpoint, synthetic scenes at several
aspect ratios, demonstrations chosen by the model's own image features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import NATIVE_OVERRIDES, TINY_OVERRIDES
from tests.in_process import run_main, train_in_process

pytestmark = pytest.mark.slow  # the checkpoint comes from a training run

STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A 2-step native-resolution run that scores synthetic_vqa at its last step."""
    root = tmp_path_factory.mktemp("native_eval")
    result = train_in_process(
        *TINY_OVERRIDES,
        *NATIVE_OVERRIDES,
        # Room for a one-shot caption prompt: two images and two captions of ~35 words.
        "training.seq_length=128",
        "model.llm.max_sequence_length=128",
        f"training.train_steps={STEPS}",
        "eval.interval=2",
        "eval.heldout_batches=1",
        "eval.tasks=[synthetic_vqa]",
        "eval.shots=[0, 1]",
        "eval.limit=3",
        f"checkpoint.save_dir={root / 'ckpt'}",
        "checkpoint.save_interval=2",
        f"logging.output_dir={root / 'run'}",
        "logging.tensorboard=false",
    )
    assert result.returncode == 0, result.log[-4000:]
    return root


def test_few_shot_scores_are_logged_during_training(run):
    lines = (run / "run" / "metrics.jsonl").read_text().splitlines()
    evaluated = [r for r in map(json.loads, lines) if "heldout/loss" in r]
    assert [r["step"] for r in evaluated] == [STEPS]
    for shots in (0, 1):
        assert 0.0 <= evaluated[0][f"eval/synthetic_vqa/{shots}shot"] <= 1.0


def test_mm1_eval_scores_the_checkpoint_with_similar_demonstrations(run, tmp_path):
    from mm1_megatron.evaluation.cli import main

    output = tmp_path / "eval"
    result = run_main(
        main,
        [
            "--checkpoint", str(run / "ckpt"),
            "--output", str(output),
            "eval.tasks=[synthetic_caption, synthetic_vqa]",
            "eval.shots=[0, 1]",
            "eval.limit=4",
            "eval.batch_size=3",  # a full batch and a batch of one
            "eval.max_new_tokens=3",
            "eval.demo_selection=similar",
        ],
    )  # fmt: skip
    assert result.returncode == 0, result.log[-4000:]
    document = json.loads((output / "results.json").read_text())
    assert document["step"] == STEPS
    assert set(document["tasks"]) == {"synthetic_caption", "synthetic_vqa"}
    for task, entry in document["tasks"].items():
        for shots in (0, 1):
            cell = entry["shots"][str(shots)]
            assert cell["num_examples"] == 4
            assert 0.0 <= cell["score"] <= (10.0 if entry["metric"] == "cider" else 1.0)
            lines = (output / "predictions" / f"{task}_{shots}shot.jsonl").read_text()
            records = [json.loads(line) for line in lines.splitlines()]
            assert len(records) == 4 and all(len(r["demos"]) == shots for r in records)
            assert all(len(r["generated_ids"]) <= 3 for r in records)
