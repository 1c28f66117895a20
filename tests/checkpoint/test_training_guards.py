"""In-process checks: NaN steps are skipped, pretrained parts load, frozen modules stay put."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.config import load_config
from mm1_megatron.training.preemption import TrainingDiverged
from mm1_megatron.training.trainer import Trainer
from tests.checkpoint.test_faults import REPO, _losses, _run
from tests.conftest import REFERENCE_STEPS


def _trainer(tmp_path, *overrides):
    cfg = load_config(
        REPO / "configs/debug.yaml",
        [
            "training.train_steps=3",
            f"logging.output_dir={tmp_path / 'run'}",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
    return Trainer(cfg)


def _snapshot(module) -> dict:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _inner(trainer):
    return trainer.model_chunks[0].module


def _inject_nan_at(trainer, step: int) -> None:
    original = trainer.loss_func

    def loss_with_nan(batch, per_token_loss):
        loss, num_tokens, report = original(batch, per_token_loss)
        if trainer.step == step - 1:  # trainer.step counts finished steps
            loss = loss * float("nan")
            report["loss"] = report["loss"] * float("nan")
        return loss, num_tokens, report

    trainer.loss_func = loss_with_nan


def test_nan_loss_step_is_not_applied_and_is_reported(megatron_single_process, tmp_path):
    trainer = _trainer(tmp_path)
    _inject_nan_at(trainer, step=2)
    trainer.train_step()
    before = _snapshot(_inner(trainer))
    adam_state_before = {
        k: v.clone()
        for k, v in next(
            iter(trainer.optimizer.chained_optimizers[0].optimizer.state.values())
        ).items()
    }
    metrics = trainer.train_step()
    assert metrics["skipped_nonfinite"] == 1.0
    after = _snapshot(_inner(trainer))
    assert all(torch.equal(before[name], after[name]) for name in before)
    adam_state_after = next(iter(trainer.optimizer.chained_optimizers[0].optimizer.state.values()))
    assert all(torch.equal(adam_state_before[k], adam_state_after[k]) for k in adam_state_before)
    metrics = trainer.train_step()  # training goes on
    assert "skipped_nonfinite" not in metrics
    assert any(not torch.equal(after[n], p) for n, p in _inner(trainer).named_parameters())


def test_too_many_nan_steps_stop_the_run(megatron_single_process, tmp_path):
    trainer = _trainer(tmp_path, "training.max_nonfinite_steps=1")
    _inject_nan_at(trainer, step=1)
    with pytest.raises(TrainingDiverged, match="max_nonfinite_steps=1"):
        trainer.train()


def test_pretrained_encoder_loads_and_frozen_modules_do_not_move(megatron_single_process, tmp_path):
    source = _trainer(
        tmp_path / "a", "training.train_steps=2", f"checkpoint.save_dir={tmp_path / 'a' / 'ckpt'}"
    )
    source.train()
    trained = _snapshot(_inner(source))
    target = _trainer(
        tmp_path / "b",
        "training.seed=77",
        "model.freeze=[vision_encoder]",
        f"checkpoint.pretrained_vision_encoder={tmp_path / 'a' / 'ckpt'}",
    )
    fresh = _trainer(tmp_path / "c", "training.seed=77")
    loaded = _snapshot(_inner(target))
    fresh_weights = _snapshot(_inner(fresh))
    for name, value in loaded.items():
        if name.startswith("vision_encoder."):
            assert torch.equal(value, trained[name]), name
        else:  # connector and language model keep their own (seed 77) initialisation
            assert torch.equal(value, fresh_weights[name]), name
    assert not all(torch.equal(loaded[n], trained[n]) for n in loaded if n.startswith("connector."))
    target.train()
    after = _snapshot(_inner(target))
    assert all(torch.equal(after[n], loaded[n]) for n in after if n.startswith("vision_encoder."))
    assert not all(torch.equal(after[n], loaded[n]) for n in after if n.startswith("connector."))


def test_async_save_resumes_exactly(reference, tmp_path):
    ckpt = tmp_path / "ckpt"
    first = _run(
        f"training.train_steps={REFERENCE_STEPS}",
        f"logging.output_dir={tmp_path / 'a'}",
        f"checkpoint.save_dir={ckpt}",
        "checkpoint.save_interval=2",
        "checkpoint.async_save=true",
        "checkpoint.keep_last=5",
    )
    assert first.returncode == 0, first.log[-3000:]
    assert "being written in the background" in first.log
    resumed = _run(
        f"training.train_steps={REFERENCE_STEPS}",
        f"logging.output_dir={tmp_path / 'b'}",
        f"checkpoint.load_dir={ckpt / 'step_00000004'}",
    )
    assert resumed.returncode == 0, resumed.log[-3000:]
    expected = _losses(reference / "run")
    assert _losses(tmp_path / "a") == expected  # background saves do not disturb training
    assert _losses(tmp_path / "b") == {5: expected[5], 6: expected[6]}
