"""Checkpoints of LoRA runs: small (adapters and their optimizer state, no base weight),
bitwise resume, their base recorded and checked, and readable at another layout by
``load_adapted_model`` (export and evaluation's path). Resharding across TP/PP/EP is in
tests/parallel/test_lora_layouts.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import IMAGE_TOKEN_ID
from tests.in_process import train_in_process

STEPS = 4
LORA = ["model.lora.rank=8", "model.lora.fully_trained=[connector]"]


def _files_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, name: str, base: Path, *extra: str):
    result = train_in_process(
        "logging.tensorboard=false",
        "logging.log_interval=1",
        f"training.train_steps={STEPS}",
        f"logging.output_dir={out / name}",
        f"checkpoint.initial_weights={base}",
        *LORA,
        *extra,
    )
    return result


@pytest.fixture(scope="module")
def lora_run(reference, tmp_path_factory):
    """A LoRA run from the reference run's last checkpoint, saving every 2 steps."""
    out = tmp_path_factory.mktemp("lora_ckpt")
    base = reference / "ckpt" / "step_00000006"
    result = _train(
        out, "full", base, f"checkpoint.save_dir={out / 'ckpt'}", "checkpoint.save_interval=2"
    )
    assert result.returncode == 0, result.log[-3000:]
    return out, base


def test_checkpoint_holds_only_what_trains(lora_run, megatron_single_process):
    from torch.distributed.checkpoint import FileSystemReader

    from mm1_megatron.models.lora import is_adapter_key

    out, base = lora_run
    step = out / "ckpt" / f"step_{STEPS:08d}"
    keys = FileSystemReader(str(step / "model_optim")).read_metadata().state_dict_metadata
    model_keys = [
        k
        for k in keys
        if k.split(".")[0] in ("vision_encoder", "language_model") and "_extra_state" not in k
    ]
    assert model_keys and all(is_adapter_key(k) for k in model_keys), model_keys[:5]
    assert any(k.startswith("connector.") and not is_adapter_key(k) for k in keys)
    record = json.loads((step / "adapter_base.json").read_text())
    assert record["initial_weights"] == str(base.resolve())
    # Per trained parameter: the weight, Adam's two moments and (as Megatron-Core saves
    # it) an fp32 copy, 16 bytes; plus metadata, RNG and configs. Measured: 3.6 MB for
    # 186,528 trained parameters (rank-8 decoder adapters and the whole connector), where
    # the base checkpoint is 18.6 MB.
    trained = _trained_parameters()
    assert _files_bytes(step) < 16 * trained + 600_000
    assert _files_bytes(base) > 5 * _files_bytes(step)


def _trained_parameters() -> int:
    from mm1_megatron.config import load_config
    from mm1_megatron.models import build_mm1_model
    from tests.conftest import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG, LORA)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_resume_is_bitwise(lora_run, tmp_path):
    out, base = lora_run
    resumed = _train(
        tmp_path, "resumed", base, f"checkpoint.load_dir={out / 'ckpt' / 'step_00000002'}"
    )
    assert resumed.returncode == 0, resumed.log[-3000:]
    full = {m["step"]: m for m in _metrics(out / "full")}
    again = _metrics(tmp_path / "resumed")
    assert [m["step"] for m in again] == [3, 4]
    for m in again:
        assert m["loss"] == full[m["step"]]["loss"], m["step"]
        assert m["grad_norm"] == full[m["step"]]["grad_norm"], m["step"]


def test_resume_on_another_base_is_refused(lora_run, reference, tmp_path):
    out, _ = lora_run
    other_base = reference / "ckpt" / "step_00000004"
    result = _train(
        tmp_path, "other", other_base, f"checkpoint.load_dir={out / 'ckpt' / 'step_00000002'}"
    )
    assert result.returncode != 0
    assert "is not the base the checkpoint" in result.log
    assert "set checkpoint.initial_weights to the recorded folder" in result.log


def test_a_lora_checkpoint_is_no_base(lora_run, tmp_path):
    out, _ = lora_run
    result = _train(tmp_path, "stacked", out / "ckpt")
    assert result.returncode != 0
    assert "is a LoRA checkpoint (adapters only), not a base model" in result.log


def test_load_adapted_model_gives_base_and_trained_weights(lora_run, megatron_single_process):
    from mm1_megatron.checkpoint import load_model_weights
    from mm1_megatron.checkpoint.adapters import load_adapted_model
    from mm1_megatron.config import load_config
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.models.lora import is_adapter_key
    from tests.conftest import DEBUG_CONFIG

    out, base = lora_run
    cfg = load_config(DEBUG_CONFIG, LORA)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID)
    assert load_adapted_model(model, out / "ckpt") == base
    plain_cfg = load_config(DEBUG_CONFIG)
    plain = build_mm1_model(plain_cfg.model, plain_cfg.parallel, image_token_id=IMAGE_TOKEN_ID)
    load_model_weights(plain, base)
    base_state, state = plain.state_dict(), model.state_dict()
    for key, value in state.items():
        if is_adapter_key(key) or not isinstance(value, torch.Tensor):  # extra state
            continue
        trained = key.startswith("connector.")
        assert torch.equal(value, base_state[key]) != trained, key
    assert all(state[k].any() for k in state if k.endswith("lora_b"))
