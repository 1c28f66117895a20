"""The shipped SFT and continual pre-training recipes hold MM1's and MM1.5's published
numbers (``shared/mm1_recipe.md``) and start from the pre-training model unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm1_megatron.config import load_config, validate_config
from mm1_megatron.data.pipeline.tiling import Grid, plan_tiles

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _config(name: str):
    return validate_config(load_config(CONFIGS / name))


@pytest.mark.parametrize("name", ["mm1_3b_sft.yaml", "mm1_5_3b_sft.yaml", "mm1_5_3b_cpt.yaml"])
def test_recipes_fine_tune_the_pretraining_model_at_672_tiles(name):
    recipe, pretraining = _config(name), _config("mm1_3b.yaml")
    # The same model, so the pre-training checkpoint loads with no missing or extra keys.
    assert recipe.model == pretraining.model
    assert recipe.checkpoint.initial_weights and recipe.data.source == "webdataset"
    vision, tiling = recipe.model.vision, recipe.data.tiling
    assert tiling.tile_size == 672 and tiling.tile_size // vision.patch_size == 48  # 48x48
    assert vision.image_size // vision.patch_size == 27  # pre-trained at 27x27
    assert recipe.model.connector.num_output_tokens == 144
    assert recipe.data.images.decoder == "pil"


def test_mm1_static_split_gives_720_image_tokens():
    recipe = _config("mm1_3b_sft.yaml")
    (plan,) = plan_tiles([(1344, 1344)], recipe.data.tiling)
    assert plan.grid == Grid(2, 2) and plan.order()[-1] == "overview"
    assert plan.num_tiles * recipe.model.connector.num_output_tokens == 720
    assert recipe.data.mixture["conversation"] == 1.0 and sum(recipe.data.mixture.values()) == 1.0
    assert recipe.training.train_steps == 10_000


def test_mm1_5_dynamic_split_and_continual_pretraining():
    sft, cpt = _config("mm1_5_3b_sft.yaml"), _config("mm1_5_3b_cpt.yaml")
    for recipe in (sft, cpt):
        t = recipe.data.tiling
        assert (t.mode, t.min_tiles, t.max_tiles, t.overview, t.max_images_to_split) == (
            "dynamic", 4, 9, "after", 3,
        )  # fmt: skip
        plans = plan_tiles([(1344, 1344)] * 3, t)  # three images: not split
        assert all(plan.grid is None for plan in plans)
    assert (cpt.training.train_steps, cpt.training.global_batch_size) == (30_000, 256)
    assert cpt.optimizer.lr_rule == "fixed" and cpt.optimizer.lr == 1e-5
    assert cpt.data.mixture == {"caption": 1.0, "interleaved": 0.0, "text": 0.0}
