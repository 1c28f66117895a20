"""One checkpoint key layout for local and Transformer Engine MoE layers (issue 24, N3).

Megatron-core's local GPT spec saves every layer's pre-MLP norm as
``mlp.linear_fc1.layer_norm_weight``, the name TE gives it where it fuses the norm into
``linear_fc1``: on dense layers. A TE MoE layer keeps a separate ``pre_mlp_layernorm``
(``TENorm``). These tests hold the local spec to TE's names, and read a local MoE
checkpoint written with the old name, once, exactly (weights and a resumed run)."""

from __future__ import annotations

import logging

import pytest
import torch

from mm1_megatron.checkpoint.manager import load_model_weights, unwrap
from mm1_megatron.models import specs
from tests.checkpoint.test_integrity import _trainer

MOE = ["model.llm.moe.num_experts=4", "model.llm.moe.top_k=2"]
# The tiny decoder with layer 0 MoE and layer 1 dense (megatron's moe_layer_freq=2).
ALTERNATING = [*MOE, "model.llm.moe.layer_frequency=2"]


def _norm_keys(model):
    return sorted(
        sharded.key
        for sharded in model.sharded_state_dict().values()
        if "layer_norm" in getattr(sharded, "key", "") or "layernorm" in getattr(sharded, "key", "")
    )


def test_local_moe_layers_save_the_pre_mlp_norm_under_te_s_name(build_tiny_model, tiny_config):
    model = build_tiny_model(tiny_config(*ALTERNATING))
    keys = [k for k in _norm_keys(model) if k.startswith("language_model.decoder.layers.")]
    # Layer 1 is dense: TE fuses its norm into linear_fc1. Layer 0 is MoE: a TENorm.
    assert "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys
    assert "language_model.decoder.layers.0.pre_mlp_layernorm.weight" in keys
    assert "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight" not in keys


@pytest.fixture
def old_local_layout(monkeypatch):
    """Build local MoE layers as megatron-core's spec did before the fix."""
    monkeypatch.setattr(specs, "_with_te_key_layout", lambda layer: layer)


def test_weights_of_an_old_local_moe_checkpoint_load_once_renamed(
    megatron_single_process, tmp_path, old_local_layout, monkeypatch, caplog
):
    saved = _trainer(
        tmp_path / "old",
        *ALTERNATING,
        "training.train_steps=1",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=1",
    )
    saved.train()
    saved.checkpoints.close()
    old_state = {
        k: v.clone()
        for k, v in unwrap(saved.model_chunks[0]).state_dict().items()
        if torch.is_tensor(v)
    }
    monkeypatch.undo()  # from here on, the fixed key layout

    fresh = _trainer(tmp_path / "new", *ALTERNATING, "training.train_steps=1")
    model = fresh.model_chunks[0]
    with caplog.at_level(logging.WARNING):
        load_model_weights(model, tmp_path / "ckpt")
    assert "old key layout of local MoE layers" in caplog.text
    for name, tensor in unwrap(model).state_dict().items():
        if torch.is_tensor(tensor) and not name.endswith("_extra_state"):
            assert torch.equal(tensor, old_state[name]), name


def test_an_old_local_moe_run_resumes_exactly(
    megatron_single_process, tmp_path, old_local_layout, monkeypatch
):
    common = (*ALTERNATING, "training.train_steps=4")
    reference = _trainer(
        tmp_path / "a",
        *common,
        f"checkpoint.save_dir={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=2",
    )
    expected = [(row["loss"], row["grad_norm"]) for row in reference.train()]
    reference.checkpoints.close()
    monkeypatch.undo()  # resumed with the fixed key layout: model and optimizer renamed
    resumed = _trainer(
        tmp_path / "b", *common, f"checkpoint.load_dir={tmp_path / 'ckpt' / 'step_00000002'}"
    )
    assert resumed.step == 2
    assert [(row["loss"], row["grad_norm"]) for row in resumed.train()] == expected[2:]
