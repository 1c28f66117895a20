"""Tiling plans: MM1's static split, MM1.5's dynamic grid (against a brute-force search),
overview placement, splitting off for samples with many images."""

from __future__ import annotations

import itertools
import re
from fractions import Fraction

import numpy as np
import pytest
import torch

from mm1_megatron.config import load_config, validate_config
from mm1_megatron.config.schema import TilingConfig
from mm1_megatron.data.pipeline.packing import Sample
from mm1_megatron.data.pipeline.tiling import (
    Grid,
    TilePlan,
    plan_tiles,
    select_grid,
    tile_image,
    tile_sample,
)


def _brute_force_grid(width, height, tile, min_tiles, max_tiles):
    """Every (cols, rows) with up to max_tiles on each side, ranked by one key."""
    ranked = []
    for cols, rows in itertools.product(range(1, max_tiles + 1), repeat=2):
        tiles = cols * rows
        if not min_tiles <= tiles <= max_tiles:
            continue
        # Largest resize that keeps the aspect ratio and fits the canvas.
        scale = min(Fraction(cols * tile, width), Fraction(rows * tile, height))
        padding = tiles * tile * tile - scale * width * scale * height
        if scale >= 1:  # covers: least padding at the image's own resolution first
            ranked.append(((0, tiles * tile * tile - width * height, padding, rows), (cols, rows)))
        else:  # least down-scaling first
            ranked.append(((1, -scale, padding, tiles, rows), (cols, rows)))
    return min(ranked)[1]


def test_dynamic_grid_equals_brute_force_search():
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(8, 4000, size=2)) for _ in range(300)]
    sizes += [(1344, 1344), (672, 672), (2016, 2016), (100, 100), (4000, 500), (500, 4000)]
    for (width, height), (min_tiles, max_tiles) in itertools.product(sizes, [(4, 9), (1, 16)]):
        got = select_grid(width, height, 672, min_tiles, max_tiles)
        expected = _brute_force_grid(width, height, 672, min_tiles, max_tiles)
        assert (got.cols, got.rows) == expected, (width, height, min_tiles, max_tiles)


@pytest.mark.parametrize(
    "size, grid",
    [
        ((1344, 1344), (2, 2)),  # exactly covered by four tiles
        ((2016, 2016), (3, 3)),  # nine tiles cover it; four would down-scale
        ((4000, 4000), (3, 3)),  # nothing covers: the least down-scaling
        ((100, 100), (2, 2)),  # small: the fewest tiles, then the best aspect match
        ((2688, 672), (4, 1)),  # a 4:1 panorama
        ((672, 2688), (1, 4)),
    ],
)
def test_dynamic_grid_examples(size, grid):
    assert select_grid(*size, 672, 4, 9) == Grid(*grid)


def test_static_split_of_1344_is_four_row_major_crops_then_the_overview():
    settings = TilingConfig(mode="static", tile_size=672)
    (plan,) = plan_tiles([(1344, 1344)], settings)
    assert plan.grid == Grid(2, 2) and plan.num_tiles == 5
    assert plan.order() == ["tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1", "overview"]
    before = plan_tiles([(1344, 1344)], TilingConfig(mode="static", overview="before"))[0]
    assert before.order()[0] == "overview" and before.num_tiles == 5
    none = plan_tiles([(1344, 1344)], TilingConfig(mode="static", overview="none"))[0]
    assert none.num_tiles == 4 and "overview" not in none.order()


def test_a_sample_over_the_image_threshold_is_not_split():
    settings = TilingConfig(mode="dynamic", max_images_to_split=3)
    two = plan_tiles([(1344, 1344)] * 2, settings)
    assert all(plan.grid is not None for plan in two)
    three = plan_tiles([(1344, 1344)] * 3, settings)
    assert three == [TilePlan(grid=None, overview="after")] * 3
    assert sum(plan.num_tiles for plan in three) == 3


def test_no_tiling_is_one_tile_per_image():
    assert [p.num_tiles for p in plan_tiles([(10, 10), (5000, 20)], TilingConfig())] == [1, 1]


@pytest.mark.parametrize(
    "override, field",
    [
        ("data.tiling.mode=grid", "data.tiling.mode"),
        ("data.tiling.overview=middle", "data.tiling.overview"),
        ("data.tiling.min_tiles=10", "data.tiling.min_tiles=10 must be <="),
        ("data.tiling.static_grid=[0, 2]", "data.tiling.static_grid"),
        ("data.tiling.max_images_to_split=1", "data.tiling.max_images_to_split"),
        ("data.tiling.tile_size=100", "multiple of model.vision.patch_size"),
    ],
)
def test_bad_tiling_settings_are_refused_by_name(override, field):
    overrides = ["data.tiling.mode=static", override]
    with pytest.raises(ValueError, match=re.escape(field)):
        validate_config(load_config("configs/debug.yaml", overrides))


def test_grid_counts_stay_within_bounds():
    for width, height in [(1, 1), (10000, 3), (3, 10000)]:
        grid = select_grid(width, height, 672, 4, 9)
        assert 4 <= grid.num_tiles <= 9
    assert select_grid(5000, 5000, 672, 1, 16) == Grid(4, 4)  # inference allows 16


def test_static_tiles_are_the_image_quadrants_in_row_major_order_then_the_overview():
    image = torch.rand(3, 1344, 1344)
    (plan,) = plan_tiles([(1344, 1344)], TilingConfig(mode="static", tile_size=672))
    tiles = tile_image(image, plan, 672, fill=[0.5, 0.5, 0.5])
    assert len(tiles) == 5
    quadrants = [
        image[:, r * 672 : (r + 1) * 672, c * 672 : (c + 1) * 672] for r in (0, 1) for c in (0, 1)
    ]
    for tile, quadrant in zip(tiles[:4], quadrants):
        assert torch.equal(tile, quadrant)  # 1344 px on a 2x2 grid of 672: no resize
    expected = torch.nn.functional.interpolate(
        image[None], size=(672, 672), mode="bilinear", antialias=True, align_corners=False
    )[0]
    torch.testing.assert_close(tiles[4], expected)


def test_a_wide_image_is_centred_on_its_canvas_with_the_fill_colour():
    image = torch.rand(3, 100, 400)  # 4:1; dynamic 4x1 grid of 100 px tiles, no resize
    (plan,) = plan_tiles([(400, 100)], TilingConfig(mode="dynamic", tile_size=100))
    assert plan.grid == Grid(4, 1)
    tiles = tile_image(image, plan, 100, fill=[0.1, 0.2, 0.3])
    assert torch.equal(torch.cat(tiles[:4], dim=2), image)
    image = torch.rand(3, 100, 300)  # 3:1 on the same 4x1 grid: padded on both sides
    tiles = tile_image(
        image,
        plan_tiles([(300, 100)], TilingConfig(mode="dynamic", tile_size=100))[0],
        100,
        fill=[0.1, 0.2, 0.3],
    )
    canvas = torch.cat(tiles[:4], dim=2)
    assert torch.equal(canvas[:, :, 50:350], image)
    assert torch.equal(
        canvas[:, :, :50], torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1).expand(3, 100, 50)
    )


def test_tile_sample_gives_each_tile_a_placeholder_and_no_loss():
    image_token = 3
    sample = Sample(
        "conversation",
        [1, 7, image_token, 8, 9, 2],
        [torch.rand(3, 224, 224)],
        trainable=[False, False, False, True, True, False],
    )
    tiled = tile_sample(
        sample,
        TilingConfig(mode="static", tile_size=112),
        image_token_id=image_token,
        fill=[0.5] * 3,
    )
    assert tiled.token_ids == [1, 7, *[image_token] * 5, 8, 9, 2]
    assert tiled.trainable == [False, False, *[False] * 5, True, True, False]
    assert len(tiled.images) == 5 and all(t.shape == (3, 112, 112) for t in tiled.images)
    three = Sample("interleaved", [image_token] * 3, [torch.rand(3, 224, 224)] * 3)
    kept = tile_sample(
        three,
        TilingConfig(mode="static", tile_size=112),
        image_token_id=image_token,
        fill=[0.5] * 3,
    )
    assert kept.token_ids == [image_token] * 3 and len(kept.images) == 3  # not split
    assert kept.trainable is None


def test_separators_go_between_the_tiles_of_one_image_only():
    from mm1_megatron.data.pipeline.tiling import repeat_placeholders

    img, sep = 3, 9
    ids, flags = repeat_placeholders(
        [1, img, 5, img, 2], [False, False, True, False, True], [3, 1], image_token_id=img,
        separator_id=sep,
    )  # fmt: skip
    assert ids == [1, img, sep, img, sep, img, 5, img, 2]
    assert flags == [False, False, False, False, False, False, True, False, True]


def test_a_cut_never_ends_inside_or_right_after_an_image_brute_force():
    """``end_at_whole_image`` keeps the longest prefix that a brute-force check accepts:
    not inside an image's tiles or separators, not ending with an image."""
    import random

    from mm1_megatron.data.pipeline.tiling import end_at_whole_image, repeat_placeholders

    img, sep, text = 3, 9, 7
    rng = random.Random(0)
    for _ in range(60):
        layout = [rng.choice([text, img]) for _ in range(rng.randint(1, 8))] + [2]
        counts = [rng.randint(1, 4) for _ in range(layout.count(img))]
        separator = rng.choice([None, sep])
        full, _ = repeat_placeholders(layout, None, counts, image_token_id=img,
                                      separator_id=separator)  # fmt: skip
        groups, position = [], 0  # (start, end) of each image's tokens, found by hand
        for count in counts:
            start = full.index(img, position)
            end = start + (count if separator is None else 2 * count - 1)
            groups.append((start, end))
            position = end
        for length in range(len(full) + 1):
            valid = [n for n in range(length + 1) if not any(s < n <= e for s, e in groups)]
            kept, tiles = end_at_whole_image(full[:length], full, counts, img)
            assert len(kept) == max(valid)
            assert tiles == sum(c for c, (s, e) in zip(counts, groups) if e <= len(kept))
