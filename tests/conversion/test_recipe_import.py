"""The Qwen3 + SigLIP recipes in practice: one ``import`` of a decoder folder and a
vision folder with the recipe as ``--config``, then training from the import."""

from __future__ import annotations

import json
import math

from mm1_megatron.config import load_config
from tests.in_process import train_in_process

REPO_CONFIGS = "configs"


def _import(sources, output, recipe, language_model, **kwargs):
    from mm1_megatron.conversion import ImportRequest, import_checkpoint

    import_checkpoint(
        ImportRequest(
            output=output,
            language_model=sources[language_model][1],
            vision_encoder=sources["siglip_vision"][1],
            base_config=f"{REPO_CONFIGS}/{recipe}",
            **kwargs,
        )
    )
    return load_config(output / "step_00000000" / "config.yaml")


def test_debug_recipe_imports_in_one_command_and_trains(sources, conversion_dir):
    output = conversion_dir / "recipe_debug_qwen3"
    cfg = _import(sources, output, "debug_qwen3_siglip2.yaml", "qwen3", vocab_size=256)
    assert (cfg.model.llm.qk_norm, cfg.model.llm.head_dim, cfg.model.llm.vocab_size) == (
        True,
        24,
        256,
    )
    assert cfg.model.vision.post_layernorm and not cfg.model.vision.use_class_token
    assert cfg.model.connector.num_output_tokens == 4  # the recipe's, not imported
    run = conversion_dir / "recipe_debug_run"
    result = train_in_process(
        f"logging.output_dir={run}",
        f"checkpoint.pretrained_language_model={output}",
        f"checkpoint.pretrained_vision_encoder={output}",
        "training.train_steps=4",
        "logging.progress_bar=false",
        config=str(output / "step_00000000" / "config.yaml"),
    )
    assert result.returncode == 0, result.log[-4000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(math.isfinite(row["loss"]) for row in rows)


def test_moe_recipe_keeps_its_training_settings_over_the_import(sources, conversion_dir):
    cfg = _import(
        sources,
        conversion_dir / "recipe_qwen3_moe",
        "mm1_qwen3_30b_a3b_siglip2.yaml",
        "qwen3_moe",
    )
    moe = cfg.model.llm.moe
    # The source's experts and routing (4 experts, top-2 on layer 0) ...
    assert (moe.num_experts, moe.top_k, moe.layer_frequency, moe.normalize_top_k) == (
        4,
        2,
        2,
        True,
    )
    # ... with the recipe's training settings, which a Hugging Face config does not fix.
    assert math.isclose(moe.aux_loss_coeff, 0.001) and moe.token_dispatcher == "alltoall"
    assert cfg.parallel.expert_parallel_size == 8


def test_native_recipe_keeps_its_patch_budget_over_the_source_processor(conversion_dir):
    """A NaFlex folder's processor says 32 patches per image; the recipe's 16 win."""
    from mm1_megatron.conversion import ImportRequest, import_checkpoint
    from tests.conversion.hf_sources import SIGLIP2_MAX_PATCHES, build_siglip2_source

    folder = conversion_dir / "recipe_naflex_source"
    build_siglip2_source("siglip2_vision", folder)
    output = conversion_dir / "recipe_naflex"
    import_checkpoint(
        ImportRequest(
            output=output,
            vision_encoder=folder,
            base_config=f"{REPO_CONFIGS}/debug_siglip2_naflex.yaml",
        )
    )
    vision = load_config(output / "step_00000000" / "config.yaml").model.vision
    info = json.loads((output / "step_00000000" / "conversion.json").read_text())
    warnings = info["warnings"]
    assert any("max_num_patches=32" in warning for warning in warnings), warnings
    assert vision.native_resolution and SIGLIP2_MAX_PATCHES == 32
    assert (
        vision.max_patches
        == load_config(f"{REPO_CONFIGS}/debug_siglip2_naflex.yaml").model.vision.max_patches
        == 16
    )
