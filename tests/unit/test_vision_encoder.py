"""The ViT: bidirectional attention, position-table resizing, image-size handling."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.models import RuntimeOptions
from mm1_megatron.models.transformer_configs import vision_transformer_config
from mm1_megatron.models.vision_encoder import VisionEncoder, interpolate_position_embedding

PATCH, IMAGE, GRID, HIDDEN = 14, 56, 4, 32


@pytest.fixture
def make_encoder(megatron_single_process, seeded, tiny_config):
    def _make(*overrides, seed=1234):
        cfg = tiny_config(*overrides)
        seeded(seed)
        config = vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
        encoder = VisionEncoder(config, cfg.model.vision)
        encoder.eval()
        return encoder

    return _make


# ---- attention is bidirectional ---------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
def test_first_patch_sees_the_last_patch(make_encoder, layers):
    encoder = make_encoder(f"model.vision.num_layers={layers}")
    images = torch.randn(2, 3, IMAGE, IMAGE)
    changed = images.clone()
    changed[:, :, IMAGE - PATCH :, IMAGE - PATCH :] = torch.randn(2, 3, PATCH, PATCH)
    with torch.no_grad():
        out, out_changed = encoder(images), encoder(changed)
    assert out.shape == (2, GRID * GRID, HIDDEN)
    # Under a causal mask patch 0 could attend only to the class token and itself.
    first_patch_change = (out[:, 0] - out_changed[:, 0]).abs().max()
    assert first_patch_change > 1e-3
    # Every output position changes, not only the last.
    assert ((out - out_changed).abs().amax(dim=-1) > 1e-4).all()


def test_patch_outputs_are_independent_of_batch_neighbours(make_encoder):
    encoder = make_encoder()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        pair = encoder(images)
        alone = encoder(images[1:])
    torch.testing.assert_close(pair[1:], alone, rtol=1e-5, atol=1e-5)


# ---- output sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("class_token", ["true", "false"])
def test_output_drops_the_class_token(make_encoder, class_token):
    encoder = make_encoder(f"model.vision.use_class_token={class_token}")
    assert (encoder.class_embedding is not None) == (class_token == "true")
    assert encoder.position_embedding.shape == (GRID * GRID + (class_token == "true"), HIDDEN)
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, IMAGE, IMAGE)).shape == (1, GRID * GRID, HIDDEN)


def test_larger_image_gives_four_times_the_patches(make_encoder):
    encoder = make_encoder()
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 2 * IMAGE, 2 * IMAGE))
    assert out.shape == (2, 4 * GRID * GRID, HIDDEN)
    assert torch.isfinite(out).all()
    # The stored table is not modified by running at another resolution.
    assert encoder.position_embedding.shape == (1 + GRID * GRID, HIDDEN)


def test_smaller_image(make_encoder):
    encoder = make_encoder()
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 28, 28)).shape == (1, 4, HIDDEN)


@pytest.mark.parametrize("size", [(IMAGE, 2 * IMAGE), (2 * IMAGE, IMAGE), (60, 60), (50, 50)])
def test_bad_image_shapes_raise(make_encoder, size):
    encoder = make_encoder()
    with pytest.raises(ValueError, match="square"):
        encoder(torch.randn(1, 3, *size))


def test_gradients_reach_all_encoder_parameters(make_encoder):
    encoder = make_encoder()
    encoder.train()
    out = encoder(torch.randn(2, 3, IMAGE, IMAGE))
    (out * torch.randn_like(out)).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ---- interpolate_position_embedding ----------------------------------------------------


def _grid_table(values: torch.Tensor, prefix_rows: int = 1, hidden: int = 3) -> torch.Tensor:
    """``values[g, g]`` -> table ``[prefix + g*g, hidden]``; row r*g + c holds values[r, c]."""
    prefix = torch.full((prefix_rows, hidden), -5.0)
    rows = values.reshape(-1, 1).expand(-1, hidden) * torch.arange(1, hidden + 1.0)
    return torch.cat([prefix, rows], dim=0)


def _patch_grid(table: torch.Tensor, prefix_rows: int = 1, channel: int = 0) -> torch.Tensor:
    rows = table[prefix_rows:, channel]
    side = int(round(rows.numel() ** 0.5))
    return rows.reshape(side, side)


def test_same_grid_returns_identical_table():
    table = torch.randn(1 + 16, 8)
    out = interpolate_position_embedding(table, num_prefix_tokens=1, new_grid=4)
    assert out.shape == table.shape and torch.equal(out, table)


@pytest.mark.parametrize("new_grid", [2, 6, 8])
def test_class_token_row_preserved_and_shape(new_grid):
    table = torch.randn(1 + 16, 8)
    out = interpolate_position_embedding(table, num_prefix_tokens=1, new_grid=new_grid)
    assert out.shape == (1 + new_grid**2, 8)
    assert torch.equal(out[0], table[0])


def test_without_prefix_rows():
    table = torch.randn(16, 8)
    out = interpolate_position_embedding(table, num_prefix_tokens=0, new_grid=8)
    assert out.shape == (64, 8)


@pytest.mark.parametrize("new_grid", [2, 3, 8, 9])
def test_constant_table_stays_constant(new_grid):
    table = torch.full((1 + 16, 5), 0.37)
    out = interpolate_position_embedding(table, num_prefix_tokens=1, new_grid=new_grid)
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-6)


@pytest.mark.parametrize("old_grid, new_grid", [(4, 8), (8, 16), (8, 12), (6, 3)])
def test_table_linear_in_column_stays_monotone_in_column(old_grid, new_grid):
    cols = torch.arange(old_grid, dtype=torch.float32)
    values = 2.0 * cols.expand(old_grid, -1) + 1.0  # values[r, c] = 2c + 1
    out = interpolate_position_embedding(
        _grid_table(values), num_prefix_tokens=1, new_grid=new_grid
    )
    grid = _patch_grid(out)
    # Varies along columns only (row-major layout kept, not transposed) ...
    torch.testing.assert_close(grid, grid[0].expand(new_grid, -1), rtol=0, atol=1e-5)
    # ... strictly increasing, symmetric about the centre, and within the original range
    # up to bicubic's small overshoot at the border (a quarter of one old step, 2.0).
    assert (grid[0, 1:] > grid[0, :-1]).all()
    assert grid.min() >= 1.0 - 0.5 and grid.max() <= 2.0 * (old_grid - 1) + 1.0 + 0.5
    torch.testing.assert_close(
        grid[0] + grid[0].flip(0), torch.full((new_grid,), 2.0 * (old_grid - 1) + 2.0)
    )
    # Every channel scales the same way (channel k holds k+1 times channel 0).
    torch.testing.assert_close(_patch_grid(out, channel=2), 3.0 * grid)


def test_linear_table_stays_close_to_linear_away_from_the_border():
    # torch's bicubic kernel (a = -0.75) reproduces constants exactly but a linear ramp
    # only approximately: inside the border the error stays below 0.1 of one old step.
    old, new = 16, 32
    cols = torch.arange(old, dtype=torch.float32)
    out = interpolate_position_embedding(
        _grid_table(cols.expand(old, -1)), num_prefix_tokens=1, new_grid=new
    )
    row = _patch_grid(out)[0]
    # align_corners=False: new column j samples old coordinate (j + 0.5) * old / new - 0.5.
    coord = (torch.arange(new) + 0.5) * old / new - 0.5
    interior = (coord >= 1.0) & (coord <= old - 3.0)
    assert interior.sum() > new // 2
    torch.testing.assert_close(row[interior], coord[interior], rtol=0, atol=0.1)
    # A least-squares line through the interior has slope old/new per new column.
    j = torch.arange(new, dtype=torch.float32)[interior]
    slope = torch.linalg.lstsq(
        torch.stack([j, torch.ones_like(j)], 1), row[interior][:, None]
    ).solution[0, 0]
    assert slope == pytest.approx(old / new, rel=0.02)


def test_table_linear_in_row_varies_along_rows_only():
    rows = torch.arange(4, dtype=torch.float32)[:, None].expand(-1, 4)  # values[r, c] = r
    out = interpolate_position_embedding(_grid_table(rows), num_prefix_tokens=1, new_grid=8)
    grid = _patch_grid(out)
    torch.testing.assert_close(grid, grid[:, :1].expand(-1, 8), rtol=0, atol=1e-5)
    assert (grid[1:, 0] > grid[:-1, 0]).all()


def test_non_square_table_raises():
    with pytest.raises(ValueError, match="square"):
        interpolate_position_embedding(torch.randn(1 + 15, 4), num_prefix_tokens=1, new_grid=4)


def test_resizing_keeps_dtype_and_is_differentiable():
    table = torch.randn(1 + 16, 4, dtype=torch.float64, requires_grad=True)
    out = interpolate_position_embedding(table, num_prefix_tokens=1, new_grid=8)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert table.grad is not None and table.grad[1:].abs().sum() > 0


# ---- SigLIP stem -----------------------------------------------------------------------


def test_default_stem_is_clip(make_encoder):
    encoder = make_encoder()
    assert encoder.patch_embedding.bias is None
    assert encoder.pre_layernorm is not None and encoder.post_layernorm is None


def test_siglip_stem_has_patch_bias_and_normalises_every_output_token(make_encoder):
    encoder = make_encoder(
        "model.vision.use_class_token=false",
        "model.vision.patch_embedding_bias=true",
        "model.vision.pre_layernorm=false",
        "model.vision.post_layernorm=true",
        "model.vision.activation=gelu_tanh",
    )
    assert encoder.patch_embedding.bias is not None and encoder.pre_layernorm is None
    with torch.no_grad():
        encoder.post_layernorm.weight.fill_(1.0)
        encoder.post_layernorm.bias.zero_()
        out = encoder(torch.randn(2, 3, IMAGE, IMAGE))
    assert out.shape == (2, GRID * GRID, HIDDEN)
    # Each token is LayerNorm-ed: zero mean and unit variance over the hidden size.
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, GRID * GRID), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.var(-1, unbiased=False), torch.ones(2, GRID * GRID), atol=1e-3, rtol=0
    )
