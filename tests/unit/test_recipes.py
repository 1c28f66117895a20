"""The Qwen3 / SigLIP 2 recipes hold what importing the published checkpoints writes.

``mm1 convert import --config RECIPE`` takes ``model.llm`` and ``model.vision`` from the
two Hugging Face folders, so a recipe whose values differ from them would document (and
estimate) a model nobody trains. The configs below are the architecture fields of the
published ``config.json`` files (Qwen/Qwen3-1.7B, Qwen/Qwen3-30B-A3B,
google/siglip2-so400m-patch16-384 and -naflex); each is translated here by the importer's
own code.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mm1_megatron.config import load_config
from mm1_megatron.conversion.source_configs import language_source, vision_source

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

QWEN3_COMMON = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN3_1_7B = {
    **QWEN3_COMMON,
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "intermediate_size": 6144,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 8,
    "tie_word_embeddings": True,
}
QWEN3_30B_A3B = {
    **QWEN3_COMMON,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "decoder_sparse_step": 1,
    "intermediate_size": 6144,
    "mlp_only_layers": [],
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
}
SIGLIP2_SO400M_16_384 = {
    "architectures": ["SiglipModel"],
    "model_type": "siglip",
    "text_config": {"model_type": "siglip_text_model", "vocab_size": 256000},
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 16,
    },
}
SIGLIP2_PREPROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
SIGLIP2_SO400M_16_NAFLEX = {
    "architectures": ["Siglip2Model"],
    "model_type": "siglip2",
    "text_config": {"model_type": "siglip2_text_model", "vocab_size": 256000},
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "model_type": "siglip2_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "num_patches": 256,
        "patch_size": 16,
    },
}
SIGLIP2_NAFLEX_PREPROCESSOR = {
    "image_processor_type": "Siglip2ImageProcessor",
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "max_num_patches": 256,
    "patch_size": 16,
}

RECIPES = {
    "mm1_qwen3_1_7b_siglip2.yaml": QWEN3_1_7B,
    "mm1_qwen3_1_7b_siglip2_naflex.yaml": QWEN3_1_7B,
    "mm1_qwen3_30b_a3b_siglip2.yaml": QWEN3_30B_A3B,
}
ENCODERS = {
    "mm1_qwen3_1_7b_siglip2.yaml": (SIGLIP2_SO400M_16_384, SIGLIP2_PREPROCESSOR),
    "mm1_qwen3_1_7b_siglip2_naflex.yaml": (SIGLIP2_SO400M_16_NAFLEX, SIGLIP2_NAFLEX_PREPROCESSOR),
    "mm1_qwen3_30b_a3b_siglip2.yaml": (SIGLIP2_SO400M_16_384, SIGLIP2_PREPROCESSOR),
}
# MoE settings the recipe sets for training; the import keeps them from --config.
TRAINING_SETTINGS = ("aux_loss_coeff", "z_loss_coeff", "token_dispatcher", "grouped_gemm")


def _folder(tmp_path: Path, name: str, config: dict, **files: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    for file_name, content in files.items():
        (folder / f"{file_name}.json").write_text(json.dumps(content))
    return folder


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_decoder_is_the_published_one(recipe, tmp_path):
    imported = language_source(_folder(tmp_path, "lm", RECIPES[recipe])).llm
    written = load_config(CONFIGS / recipe).model.llm
    settings = {name: getattr(written.moe, name) for name in TRAINING_SETTINGS}
    assert dataclasses.replace(imported, moe=dataclasses.replace(imported.moe, **settings)) == (
        written
    )


@pytest.mark.parametrize("recipe", sorted(ENCODERS))
def test_recipe_encoder_is_the_published_one(recipe, tmp_path):
    config, preprocessor = ENCODERS[recipe]
    folder = _folder(tmp_path, "vision", config, preprocessor_config=preprocessor)
    imported, written = vision_source(folder), load_config(CONFIGS / recipe).model.vision
    if written.native_resolution:  # the patch budget is the recipe's (see the import)
        imported = dataclasses.replace(imported, max_patches=written.max_patches)
    assert imported == written
