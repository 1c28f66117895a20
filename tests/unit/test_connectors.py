"""Connectors: output shapes, gradient flow, what each one computes, and the one table
that builds them for training and for the exported model."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch

from mm1_megatron.config.schema import ConnectorType
from mm1_megatron.hf_model.connectors_mm1 import CONNECTORS, build_connector_net, resize_grid_table
from mm1_megatron.models import RuntimeOptions
from mm1_megatron.models.connectors import Connector
from mm1_megatron.models.transformer_configs import vision_transformer_config

VISION_HIDDEN, LLM_HIDDEN = 32, 48
GRID = 4  # configs/debug.yaml: 56 px / 14 px patches
NUM_PATCHES = GRID * GRID


@pytest.fixture
def vision_config(megatron_single_process, tiny_config):
    cfg = tiny_config()
    return vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())


@pytest.fixture
def connector_cfg(tiny_config):
    def _make(**changes):
        return dataclasses.replace(tiny_config().model.connector, **changes)

    return _make


def _connector(vision_config, cfg, num_patches=NUM_PATCHES):
    return Connector(
        vision_config,
        cfg,
        vision_hidden=VISION_HIDDEN,
        llm_hidden=LLM_HIDDEN,
        num_patches=num_patches,
    )


CASES = [
    ("c_abstractor", 1),
    ("c_abstractor", 4),
    ("c_abstractor", 16),
    ("avg_pool", 1),
    ("avg_pool", 4),
    ("avg_pool", 16),
    ("attn_pool", 4),
    ("attn_pool", 16),
    ("attn_pool", 9),
    ("mlp", NUM_PATCHES),
]


@pytest.mark.parametrize("kind, tokens", CASES, ids=[f"{k}-{t}" for k, t in CASES])
def test_output_shape_and_gradients(kind, tokens, vision_config, connector_cfg, seeded):
    connector = _connector(vision_config, connector_cfg(type=kind, num_output_tokens=tokens))
    features = torch.randn(3, NUM_PATCHES, VISION_HIDDEN, requires_grad=True)
    out = connector(features)
    assert out.shape == (3, tokens, LLM_HIDDEN)
    assert torch.isfinite(out).all()

    (out * torch.randn_like(out)).sum().backward()
    params = dict(connector.named_parameters())
    assert params, "connector has no parameters"
    for name, param in params.items():
        assert param.grad is not None, f"{name} got no gradient"
        assert param.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize("blocks", [0, 2])
def test_c_abstractor_block_counts(blocks, vision_config, connector_cfg, seeded):
    connector = _connector(
        vision_config, connector_cfg(num_output_tokens=4, num_blocks_per_stage=blocks)
    )
    assert len(connector.net.stage1) == blocks and len(connector.net.stage2) == blocks
    assert connector(torch.randn(2, NUM_PATCHES, VISION_HIDDEN)).shape == (2, 4, LLM_HIDDEN)


@pytest.mark.parametrize("layers", [1, 3])
def test_readout_depth(layers, vision_config, connector_cfg, seeded):
    connector = _connector(
        vision_config, connector_cfg(type="mlp", num_output_tokens=16, num_readout_layers=layers)
    )
    linears = [m for m in connector.net.readout if isinstance(m, torch.nn.Linear)]
    assert len(linears) == layers
    assert linears[0].in_features == VISION_HIDDEN
    assert all(m.out_features == LLM_HIDDEN for m in linears)


def test_avg_pool_averages_row_major_quadrants(vision_config, connector_cfg, seeded):
    connector = _connector(vision_config, connector_cfg(type="avg_pool", num_output_tokens=4))
    features = torch.randn(2, NUM_PATCHES, VISION_HIDDEN)
    grid = features.reshape(2, GRID, GRID, VISION_HIDDEN)  # patch index = row * GRID + col
    quadrants = [grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)]
    expected = connector.net.readout(torch.stack(quadrants, dim=1))
    torch.testing.assert_close(connector(features), expected, rtol=1e-5, atol=1e-6)


def test_mlp_connector_is_per_token(vision_config, connector_cfg, seeded):
    connector = _connector(vision_config, connector_cfg(type="mlp", num_output_tokens=16))
    features = torch.randn(2, NUM_PATCHES, VISION_HIDDEN)
    out = connector(features)
    changed = features.clone()
    changed[:, 5] += 1.0
    out2 = connector(changed)
    assert not torch.allclose(out[:, 5], out2[:, 5])
    others = [i for i in range(NUM_PATCHES) if i != 5]
    torch.testing.assert_close(out[:, others], out2[:, others])


def test_attn_pool_ignores_patch_order(vision_config, connector_cfg, seeded):
    # Learned queries cross-attend without positions: permuting patches changes nothing.
    connector = _connector(vision_config, connector_cfg(type="attn_pool", num_output_tokens=4))
    features = torch.randn(2, NUM_PATCHES, VISION_HIDDEN)
    perm = torch.randperm(NUM_PATCHES)
    torch.testing.assert_close(
        connector(features), connector(features[:, perm]), rtol=1e-5, atol=1e-6
    )


def test_c_abstractor_depends_on_patch_position(vision_config, connector_cfg, seeded):
    # The C-Abstractor adds a learned grid position embedding: order matters.
    connector = _connector(vision_config, connector_cfg(num_output_tokens=1))
    features = torch.randn(2, NUM_PATCHES, VISION_HIDDEN)
    perm = torch.randperm(NUM_PATCHES)
    assert not torch.allclose(connector(features), connector(features[:, perm]), atol=1e-6)


def test_c_abstractor_reads_its_position_table_at_other_grids(vision_config, connector_cfg, seeded):
    # Pre-trained on a 4x4 patch grid, fed a 7x7 grid (a larger tile): the learned table
    # resized bicubically to 7x7 is added, the same output tokens come out, and the
    # parameter keeps its shape (the pre-training checkpoint loads as it is).
    connector = _connector(vision_config, connector_cfg(num_output_tokens=4))
    net = connector.net
    table = net.position_embedding
    assert resize_grid_table(table, GRID) is table  # the original grid: untouched
    features = torch.randn(2, 49, VISION_HIDDEN)
    out = connector(features)
    assert out.shape == (2, 4, LLM_HIDDEN)
    resized = torch.nn.functional.interpolate(
        table.detach().reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2),
        size=(7, 7),
        mode="bicubic",
        align_corners=False,
    )
    expected = resized.permute(0, 2, 3, 1).reshape(49, -1)
    torch.testing.assert_close(resize_grid_table(table, 7), expected, rtol=0, atol=0)
    # Without the position table's contribution the output would differ.
    with torch.no_grad():
        net.position_embedding.zero_()
    assert not torch.allclose(connector(features), out)
    assert dict(connector.state_dict())["net.position_embedding"].shape == (
        NUM_PATCHES,
        VISION_HIDDEN,
    )


def test_c_abstractor_rejects_a_non_square_patch_count(vision_config, connector_cfg, seeded):
    connector = _connector(vision_config, connector_cfg(num_output_tokens=4))
    with pytest.raises(ValueError, match="square"):
        connector(torch.randn(1, 24, VISION_HIDDEN))


def test_pooling_connectors_reject_non_square_patch_count(vision_config, connector_cfg, seeded):
    connector = _connector(vision_config, connector_cfg(type="avg_pool", num_output_tokens=4))
    with pytest.raises(ValueError, match="square"):
        connector(torch.randn(1, 15, VISION_HIDDEN))


def test_unknown_type_raises(vision_config, connector_cfg):
    with pytest.raises(ValueError, match="qformer"):
        _connector(vision_config, connector_cfg(type="qformer"))


def test_the_table_builds_exactly_the_config_choices():
    assert set(typing.get_args(ConnectorType)) == set(CONNECTORS)
    assert len(typing.get_args(ConnectorType)) == len(CONNECTORS)


def test_a_connector_config_missing_a_field_names_it():
    with pytest.raises(ValueError, match="num_blocks_per_stage"):
        build_connector_net(
            {"type": "c_abstractor", "num_output_tokens": 4},
            vision_hidden=VISION_HIDDEN,
            llm_hidden=LLM_HIDDEN,
            num_patches=NUM_PATCHES,
            init_std=0.02,
        )


def test_connector_params_are_float32_and_deterministic(vision_config, connector_cfg, seeded):
    a = _connector(vision_config, connector_cfg())
    seeded(1234)
    b = _connector(vision_config, connector_cfg())
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert pa.dtype == torch.float32
        assert torch.equal(pa, pb), name
