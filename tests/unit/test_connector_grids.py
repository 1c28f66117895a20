"""Connectors on native-resolution images: ``forward_grids(features, grids)`` takes the
packed patches of images of any ``(rows, cols)`` grid and gives each image
``num_output_tokens`` tokens. Checked against the square path, against references built
from the unpacked grids, and image by image."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F

from mm1_megatron.config.schema import ConnectorConfig
from mm1_megatron.hf_model.connectors_mm1 import build_connector_net, resize_grid_table

VISION_HIDDEN, LLM_HIDDEN = 32, 48
GRID = 4  # the grid the C-Abstractor's position table was made for
POOLING = ["c_abstractor", "avg_pool", "attn_pool"]
ASPECT_RATIOS = [(4, 4), (2, 8), (8, 2), (3, 5), (12, 20)]
# Shapes repeat, so images share batches; image 2 shares its batch with image 0.
MIXED_PACK = [(4, 4), (2, 8), (4, 4), (3, 5), (2, 8), (12, 20), (8, 2)]


def _net(kind: str, tokens: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ConnectorConfig(
        type=kind,
        num_output_tokens=tokens,
        hidden_size=32,
        num_blocks_per_stage=1,
        num_readout_layers=2,
        num_attention_heads=4,
    )
    return build_connector_net(
        dataclasses.asdict(cfg),
        vision_hidden=VISION_HIDDEN,
        llm_hidden=LLM_HIDDEN,
        num_patches=GRID * GRID,
        init_std=0.02,
    )


def _pack(grids, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    total = sum(rows * cols for rows, cols in grids)
    return torch.randn(total, VISION_HIDDEN, generator=generator)


def _unpack(features: torch.Tensor, grids):
    """Image ``i`` as ``[1, c, rows, cols]``, the reference's own way of cutting the pack."""
    images, start = [], 0
    for rows, cols in grids:
        patches = features[start : start + rows * cols]
        images.append(patches.reshape(rows, cols, -1).permute(2, 0, 1).unsqueeze(0))
        start += rows * cols
    return images


def _tokens(grid: torch.Tensor) -> torch.Tensor:
    """``[1, c, h, w]`` -> ``[1, h*w, c]``, row-major."""
    return grid.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("kind", POOLING)
@pytest.mark.parametrize("side", [GRID, 7])
def test_square_grids_match_the_square_forward(kind, side):
    net = _net(kind)
    features = torch.randn(3, side * side, VISION_HIDDEN)
    expected = net(features)
    packed = net.forward_grids(features.reshape(-1, VISION_HIDDEN), [(side, side)] * 3)
    torch.testing.assert_close(packed, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", POOLING)
@pytest.mark.parametrize("tokens", [4, 144])
def test_every_aspect_ratio_gives_num_output_tokens(kind, tokens):
    # 144 tokens (12x12) from 2x8, 8x2, 3x5 and 4x4 grids: the pooling upsamples.
    out = _net(kind, tokens).forward_grids(_pack(ASPECT_RATIOS), ASPECT_RATIOS)
    assert out.shape == (len(ASPECT_RATIOS), tokens, LLM_HIDDEN)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", POOLING)
def test_an_image_does_not_depend_on_the_rest_of_its_pack(kind):
    net = _net(kind)
    features = _pack(MIXED_PACK)
    out = net.forward_grids(features, MIXED_PACK)
    start = sum(rows * cols for rows, cols in MIXED_PACK[:2])
    changed = features.clone()
    changed[start : start + 16] += torch.randn(16, VISION_HIDDEN)  # image 2, a 4x4 grid
    changed_out = net.forward_grids(changed, MIXED_PACK)
    assert not torch.allclose(changed_out[2], out[2])
    others = [i for i in range(len(MIXED_PACK)) if i != 2]
    assert torch.equal(changed_out[others], out[others])


@pytest.mark.parametrize("kind", POOLING)
def test_a_packed_image_gives_what_it_gives_alone(kind):
    net = _net(kind, tokens=9)
    features = _pack(MIXED_PACK)
    out = net.forward_grids(features, MIXED_PACK)
    for index, image in enumerate(_unpack(features, MIXED_PACK)):
        rows, cols = MIXED_PACK[index]
        alone = net.forward_grids(_tokens(image)[0], [(rows, cols)])
        torch.testing.assert_close(out[index : index + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [4, 9, 144])
def test_avg_pool_is_adaptive_average_pooling_of_each_grid(tokens):
    net = _net("avg_pool", tokens)
    features = _pack(MIXED_PACK)
    side = math.isqrt(tokens)
    expected = torch.cat(
        [
            net.readout(_tokens(F.adaptive_avg_pool2d(image, side)))
            for image in _unpack(features, MIXED_PACK)
        ]
    )
    out = net.forward_grids(features, MIXED_PACK)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_a_grid_smaller_than_the_output_repeats_its_patches():
    # 3x4 patches into 12x12 tokens: each patch fills a 4x3 block of tokens (the accepted
    # behaviour for small grids; see the comment above connectors_mm1._checked_grids).
    net = _net("avg_pool", tokens=144)
    features = _pack([(3, 4)])
    out = net.forward_grids(features, [(3, 4)])[0].reshape(12, 12, LLM_HIDDEN)
    patches = net.readout(features).reshape(3, 4, LLM_HIDDEN)
    expected = patches.repeat_interleave(4, dim=0).repeat_interleave(3, dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_c_abstractor_reads_its_position_table_resized_to_each_grid():
    net = _net("c_abstractor", tokens=9)
    features = _pack(MIXED_PACK)
    table = net.position_embedding.detach().reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    expected = []
    for image in _unpack(features, MIXED_PACK):
        rows, cols = image.shape[2:]
        positions = F.interpolate(table, size=(rows, cols), mode="bicubic", align_corners=False)
        grid = net.stage1(image + positions)
        grid = net.stage2(F.adaptive_avg_pool2d(grid, 3))
        expected.append(net.readout(_tokens(grid)))
    out = net.forward_grids(features, MIXED_PACK)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_resize_grid_table_takes_a_non_square_size():
    table = torch.randn(GRID * GRID, VISION_HIDDEN)
    assert resize_grid_table(table, (GRID, GRID)) is table
    grid = table.reshape(1, GRID, GRID, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 8), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(16, -1)
    torch.testing.assert_close(resize_grid_table(table, (2, 8)), expected, rtol=0, atol=0)


def test_attn_pool_reads_any_patch_count():
    # Attention pooling needs no grid: the packed image equals the square-path forward on
    # its patches, whatever their count.
    net = _net("attn_pool")
    features = _pack(MIXED_PACK)
    out = net.forward_grids(features, MIXED_PACK)
    for index, image in enumerate(_unpack(features, MIXED_PACK)):
        torch.testing.assert_close(
            out[index : index + 1], net(_tokens(image)), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", POOLING)
def test_gradients_reach_every_parameter_and_image(kind):
    net = _net(kind)
    features = _pack(MIXED_PACK).requires_grad_()
    out = net.forward_grids(features, MIXED_PACK)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in net.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    for index, image_grad in enumerate(_unpack(features.grad, MIXED_PACK)):
        assert image_grad.abs().sum() > 0, f"image {index} got no gradient"


def test_the_mlp_connector_refuses_grids_and_names_the_fix():
    with pytest.raises(ValueError, match=r"model\.connector\.type='mlp'.*'avg_pool'"):
        _net("mlp", tokens=16).forward_grids(_pack([(4, 4)]), [(4, 4)])


@pytest.mark.parametrize(
    "features, grids, message",
    [
        (torch.randn(20, VISION_HIDDEN), [(4, 4)], "hold 16 patches"),
        (torch.randn(16, VISION_HIDDEN), [(0, 4), (4, 4)], "positive sides"),
        (torch.randn(16, VISION_HIDDEN), [], "one or more"),
        (torch.randn(1, 16, VISION_HIDDEN), [(4, 4)], r"\[total_patches, hidden\]"),
    ],
    ids=["patch-count", "empty-side", "no-images", "not-packed"],
)
def test_bad_packs_are_refused(features, grids, message):
    with pytest.raises(ValueError, match=message):
        _net("avg_pool").forward_grids(features, grids)


def test_the_megatron_connector_routes_grids(megatron_single_process, tiny_config):
    from mm1_megatron.models import RuntimeOptions
    from mm1_megatron.models.connectors import Connector
    from mm1_megatron.models.transformer_configs import vision_transformer_config

    cfg = tiny_config()
    connector = Connector(
        vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions()),
        dataclasses.replace(cfg.model.connector, num_output_tokens=4),
        vision_hidden=VISION_HIDDEN,
        llm_hidden=LLM_HIDDEN,
        num_patches=GRID * GRID,
    )
    features = _pack(MIXED_PACK)
    out = connector(features, grids=MIXED_PACK)
    assert torch.equal(out, connector.net.forward_grids(features, MIXED_PACK))
    square = torch.randn(2, GRID * GRID, VISION_HIDDEN)
    assert torch.equal(connector(square), connector.net(square))
