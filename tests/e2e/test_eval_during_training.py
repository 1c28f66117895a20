"""``eval.interval``: held-out loss per source and few-shot scores logged with the step's
metrics and recorded in the checkpoint. The held-out loss is checked against an
independent computation: the saved weights run on the same held-out batches."""

from __future__ import annotations

import json

import torch

from mm1_megatron.batch import model_inputs, run_model
from tests.conftest import TINY_OVERRIDES
from tests.in_process import train_in_process

STEPS = 4


def test_held_out_loss_and_few_shot_scores_are_logged_and_checkpointed(tmp_path):
    overrides = [
        *TINY_OVERRIDES,
        f"training.train_steps={STEPS}",
        "eval.interval=2",
        "eval.heldout_batches=2",
        "eval.tasks=[synthetic_vqa]",
        "eval.shots=[0, 1]",
        "eval.limit=4",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        f"logging.output_dir={tmp_path / 'run'}",
        "logging.tensorboard=false",
    ]
    result = train_in_process(*overrides)
    assert result.returncode == 0, result.log[-4000:]
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    evaluated = [r for r in records if "heldout/loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    for record in evaluated:
        for name in (
            "heldout/loss/caption",
            "eval/synthetic_vqa/0shot",
            "eval/synthetic_vqa/1shot",
        ):
            assert name in record
        assert 0.0 <= record["eval/synthetic_vqa/0shot"] <= 1.0
    assert evaluated[1]["heldout/loss"] < evaluated[0]["heldout/loss"] * 1.5
    state = json.loads((tmp_path / "ckpt" / "step_00000004" / "trainer_state.json").read_text())
    assert state["last_evaluation"]["step"] == 4
    assert state["last_evaluation"]["heldout/loss"] == evaluated[1]["heldout/loss"]
    assert (
        abs(_independent_heldout_loss(tmp_path / "ckpt", overrides) - evaluated[1]["heldout/loss"])
        < 1e-5 * evaluated[1]["heldout/loss"]
    )


def _independent_heldout_loss(checkpoint, overrides) -> float:
    """The saved weights in one process, on the held-out batches built directly."""
    from megatron.core import parallel_state

    from mm1_megatron.checkpoint import load_model_weights
    from mm1_megatron.config import load_config
    from mm1_megatron.data.build import build_run_data
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import init_distributed, seed_everything
    from mm1_megatron.training.periodic_eval import HELDOUT_SEED_OFFSET
    from tests.conftest import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG, overrides)
    if not torch.distributed.is_initialized():
        init_distributed(cfg.parallel)
    seed_everything(cfg.training.seed)
    assert parallel_state.get_data_parallel_world_size() == 1
    loader, tokenizer = build_run_data(cfg, seed=cfg.training.seed + HELDOUT_SEED_OFFSET)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=tokenizer.image_token_id)
    load_model_weights(model, checkpoint)
    model.eval()
    total, tokens = 0.0, 0.0
    with torch.no_grad():
        for _ in range(cfg.eval.heldout_batches):
            inputs = model_inputs(next(loader), torch.device("cpu"))
            per_token = run_model(model, inputs)
            total += float((per_token.float() * inputs["loss_mask"]).sum())
            tokens += float(inputs["loss_mask"].sum())
    return total / tokens
