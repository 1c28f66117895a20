"""Grouped-GEMM experts (Transformer Engine's ``TEGroupedMLP``) are redrawn expert by expert
with ``draw_expert_weights``; these tests hold that draw against the independent path it
must reproduce: the seeded ``SequentialMLP`` experts that every layout test starts from.
(``TEGroupedMLP`` itself needs Transformer Engine, absent here; the wiring that copies
into its ``weight{i}`` is checked with a stand-in of the same attribute layout.)"""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.compat.experts import grouped_expert_weights
from mm1_megatron.models import build_mm1_model, seeding
from tests.conftest import IMAGE_TOKEN_ID

MOE = ["model.llm.moe.num_experts=4", "model.llm.moe.top_k=2"]


def _sequential_experts(model):
    return [
        layer.mlp.experts
        for layer in model.language_model.decoder.layers
        if hasattr(layer.mlp, "experts")
    ]


def test_expert_draw_equals_seeded_sequential_experts(seeded, tiny_config, monkeypatch):
    keys = []
    original = seeding._draw_layer_key

    def recording():
        keys.append(original())
        return keys[-1]

    monkeypatch.setattr(seeding, "_draw_layer_key", recording)
    cfg = tiny_config(*MOE)
    seeded(7)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID, init_seed=7)
    layers = _sequential_experts(model)
    assert len(layers) == len(keys) > 0
    config = model.language_model.config
    for layer_key, experts in zip(keys, layers):
        for index, expert in enumerate(experts.local_experts):
            fc1 = torch.empty_like(expert.linear_fc1.weight)
            fc2 = torch.empty_like(expert.linear_fc2.weight)
            seeding.draw_expert_weights(config, layer_key, index, fc1, fc2)
            assert torch.equal(fc1, expert.linear_fc1.weight), f"expert {index} fc1"
            assert torch.equal(fc2, expert.linear_fc2.weight), f"expert {index} fc2"
    # Different experts of a layer really differ (the test would pass on a constant draw).
    first = layers[0].local_experts
    assert not torch.equal(first[0].linear_fc1.weight, first[1].linear_fc1.weight)


class _GroupedLinearStandIn(torch.nn.Module):
    def __init__(self, num_gemms, out_features, in_features):
        super().__init__()
        for i in range(num_gemms):
            self.register_parameter(
                f"weight{i}", torch.nn.Parameter(torch.zeros(out_features, in_features))
            )


def test_grouped_layout_is_read_by_local_index_and_a_renamed_layout_fails_loudly():
    module = torch.nn.Module()
    module.linear_fc1 = _GroupedLinearStandIn(2, 6, 4)
    module.linear_fc2 = _GroupedLinearStandIn(2, 4, 3)
    fc1, fc2 = grouped_expert_weights(module, 1)
    assert fc1 is module.linear_fc1.weight1 and fc2 is module.linear_fc2.weight1
    with pytest.raises(RuntimeError, match="weight2"):
        grouped_expert_weights(module, 2)
