"""Tiling plans: MM1's static split, MM1.5's dynamic grid (against a brute-force search),
overview placement, splitting off for samples with many images."""

from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from mm1_megatron.data.pipeline.tiling import (
    Grid,
    TilePlan,
    TilingSettings,
    plan_tiles,
    select_grid,
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
    settings = TilingSettings(mode="static", tile_size=672)
    (plan,) = plan_tiles([(1344, 1344)], settings)
    assert plan.grid == Grid(2, 2) and plan.num_tiles == 5
    assert plan.order() == ["tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1", "overview"]
    before = plan_tiles([(1344, 1344)], TilingSettings(mode="static", overview="before"))[0]
    assert before.order()[0] == "overview" and before.num_tiles == 5
    none = plan_tiles([(1344, 1344)], TilingSettings(mode="static", overview="none"))[0]
    assert none.num_tiles == 4 and "overview" not in none.order()


def test_a_sample_over_the_image_threshold_is_not_split():
    settings = TilingSettings(mode="dynamic", max_images_to_split=3)
    two = plan_tiles([(1344, 1344)] * 2, settings)
    assert all(plan.grid is not None for plan in two)
    three = plan_tiles([(1344, 1344)] * 3, settings)
    assert three == [TilePlan(grid=None, overview="after")] * 3
    assert sum(plan.num_tiles for plan in three) == 3


def test_no_tiling_is_one_tile_per_image():
    assert [p.num_tiles for p in plan_tiles([(10, 10), (5000, 20)], TilingSettings())] == [1, 1]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "grid"}, "tiling mode"),
        ({"overview": "middle"}, "overview"),
        ({"min_tiles": 10, "max_tiles": 9}, "min_tiles"),
        ({"static_grid": (0, 2)}, "static_grid"),
        ({"max_images_to_split": 1}, "max_images_to_split"),
    ],
)
def test_bad_settings_are_refused_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TilingSettings(**kwargs)


def test_grid_counts_stay_within_bounds():
    for width, height in [(1, 1), (10000, 3), (3, 10000)]:
        grid = select_grid(width, height, 672, 4, 9)
        assert 4 <= grid.num_tiles <= 9
    assert select_grid(5000, 5000, 672, 1, 16) == Grid(4, 4)  # inference allows 16
