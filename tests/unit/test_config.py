"""Config loading, dotted overrides, type checks, round trip, and cross-field validation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mm1_megatron.config import (
    MM1Config,
    ParallelConfig,
    load_config,
    save_config,
    validate_config,
)
from mm1_megatron.config.schema import MODEL_PARTS
from mm1_megatron.parallel.distributed import check_world_size

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DEBUG = CONFIG_DIR / "debug.yaml"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def _debug(*overrides):
    return load_config(DEBUG, list(overrides))


def _validation_error(*overrides) -> str:
    cfg = _debug(*overrides)
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    return str(info.value)


# ---- loading ---------------------------------------------------------------------------


def test_configs_directory_ships_the_expected_files():
    names = {p.name for p in SHIPPED}
    assert {"debug.yaml", "mm1_3b.yaml", "mm1_7b.yaml", "mm1_30b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, MM1Config)
    assert validate_config(cfg) is cfg


def test_debug_yaml_values_are_read():
    cfg = _debug()
    assert cfg.model.vision.image_size == 56
    assert cfg.model.connector.type == "c_abstractor"
    assert cfg.model.llm.num_query_groups == 2
    assert cfg.optimizer.lr == pytest.approx(0.003)
    assert cfg.optimizer.lr_multipliers == {"connector": 1.0}
    # Keys the file leaves out keep the schema defaults.
    assert cfg.model.llm.rotary_base == 10000
    assert cfg.data.mixture == {"interleaved": 0.45, "caption": 0.45, "text": 0.10}


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == MM1Config()


def test_missing_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "nope.yaml")


# ---- overrides -------------------------------------------------------------------------


def test_override_int():
    cfg = _debug("model.llm.num_layers=4", "training.train_steps=7")
    assert cfg.model.llm.num_layers == 4 and type(cfg.model.llm.num_layers) is int
    assert cfg.training.train_steps == 7 and type(cfg.training.train_steps) is int


def test_override_into_a_dict_field():
    cfg = _debug(
        "optimizer.lr_multipliers.connector=2.0", "optimizer.lr_multipliers.vision_encoder=3"
    )
    assert cfg.optimizer.lr_multipliers == {"connector": 2.0, "vision_encoder": 3.0}
    # A dict[str, float] field turns the YAML int 3 into a float.
    assert type(cfg.optimizer.lr_multipliers["vision_encoder"]) is float


def test_override_null_sets_optional_to_none():
    assert _debug().model.llm.num_query_groups == 2
    assert _debug("model.llm.num_query_groups=null").model.llm.num_query_groups is None


def test_override_bool_str_float_and_list():
    cfg = _debug(
        "parallel.sequence_parallel=true",
        "model.connector.type=avg_pool",
        "optimizer.lr=0.5",
        "model.vision.image_mean=[0.1, 0.2, 0.3]",
    )
    assert cfg.parallel.sequence_parallel is True
    assert cfg.model.connector.type == "avg_pool"
    assert cfg.optimizer.lr == 0.5 and type(cfg.optimizer.lr) is float
    assert cfg.model.vision.image_mean == [0.1, 0.2, 0.3]


def test_override_int_literal_for_float_field_becomes_float():
    cfg = _debug("optimizer.min_lr_ratio=0")
    assert cfg.optimizer.min_lr_ratio == 0.0 and type(cfg.optimizer.min_lr_ratio) is float


def test_override_integral_float_for_int_field_is_accepted():
    cfg = _debug("training.train_steps=10.0")
    assert cfg.training.train_steps == 10 and type(cfg.training.train_steps) is int


def test_later_override_wins():
    assert _debug("model.llm.num_layers=2", "model.llm.num_layers=8").model.llm.num_layers == 8


def test_override_scientific_notation_without_dot():
    # PyYAML (YAML 1.1) reads "1e-4" as a string; float fields must still accept it.
    cfg = _debug("optimizer.lr=1e-4", "model.llm.moe.aux_loss_coeff=5E-3")
    assert cfg.optimizer.lr == pytest.approx(1e-4) and type(cfg.optimizer.lr) is float
    assert cfg.model.llm.moe.aux_loss_coeff == pytest.approx(5e-3)


def test_yaml_file_scientific_notation_without_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr_rule: fixed\n  lr: 3e-4\n")
    assert load_config(path).optimizer.lr == pytest.approx(3e-4)


def test_numeric_strings_are_not_accepted_for_int_fields():
    with pytest.raises(ValueError, match="training.train_steps"):
        _debug("training.train_steps=1e3")


def test_malformed_override_rejected():
    with pytest.raises(ValueError, match="section.field=value"):
        _debug("model.llm.num_layers")


def test_override_through_a_value_rejected():
    with pytest.raises(ValueError, match="model.llm.num_layers"):
        _debug("model.llm.num_layers.x=1")


def test_include_merges_files_and_own_keys_win(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "enc.yaml").write_text(
        "model:\n  vision:\n    hidden_size: 48\n    num_layers: 3\n"
    )
    (tmp_path / "main.yaml").write_text(
        "include: parts/enc.yaml\nmodel:\n  vision:\n    num_layers: 5\n"
    )
    cfg = load_config(tmp_path / "main.yaml")
    assert cfg.model.vision.hidden_size == 48  # from the included file
    assert cfg.model.vision.num_layers == 5  # the including file wins
    assert cfg.model.vision.patch_size == 14  # untouched default


def test_include_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ValueError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_mm1_configs_share_the_vit_h_encoder():
    for name in ("mm1_3b.yaml", "mm1_7b.yaml", "mm1_30b.yaml"):
        v = load_config(CONFIG_DIR / name).model.vision
        assert (
            v.image_size,
            v.patch_size,
            v.hidden_size,
            v.num_layers,
            v.num_attention_heads,
            v.ffn_hidden_size,
        ) == (378, 14, 1280, 32, 16, 5120)


# ---- unknown keys and types ------------------------------------------------------------


@pytest.mark.parametrize(
    "override, path, suggestion",
    [
        ("model.llm.num_layer=3", "model.llm.num_layer", "num_layers"),
        ("model.llm.moe.num_expert=3", "model.llm.moe.num_expert", "num_experts"),
        ("training.train_step=3", "training.train_step", "train_steps"),
        ("optimizer.warmup_step=3", "optimizer.warmup_step", "warmup_steps"),
        ("paralel.tensor_parallel_size=2", "paralel", "parallel"),
    ],
)
def test_unknown_key_names_path_and_suggests(override, path, suggestion):
    with pytest.raises(ValueError) as info:
        _debug(override)
    message = str(info.value)
    assert f"'{path}'" in message
    assert f"Did you mean '{suggestion}'" in message


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  vision:\n    patch_sise: 16\n")
    with pytest.raises(ValueError, match=r"model\.vision\.patch_sise.*patch_size"):
        load_config(path)


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ValueError) as info:
        _debug("model.zzzzzz=1")
    assert "model.zzzzzz" in str(info.value)
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "override, field",
    [
        ("training.train_steps=abc", "training.train_steps"),
        ("training.train_steps=true", "training.train_steps"),  # bool is not an int
        ("training.train_steps=2.5", "training.train_steps"),
        ("model.llm.num_query_groups=two", "model.llm.num_query_groups"),
        ("model.vision.use_class_token=1", "model.vision.use_class_token"),  # int is not a bool
        ("optimizer.min_lr_ratio=false", "optimizer.min_lr_ratio"),  # bool is not a float
        ("model.vision.image_mean=0.5", "model.vision.image_mean"),
        ("model.vision.image_mean=[0.5, x, 0.5]", "model.vision.image_mean[1]"),
        ("optimizer.lr_multipliers=2", "optimizer.lr_multipliers"),
        ("optimizer.lr_multipliers.connector=fast", "optimizer.lr_multipliers.connector"),
        ("model.llm=3", "model.llm"),
    ],
)
def test_wrong_type_names_the_field(override, field):
    with pytest.raises(ValueError) as info:
        _debug(override)
    assert str(info.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "override, field",
    [
        ("optimizer.lr_multipliers.vision=2.0", "optimizer.lr_multipliers.vision: 'vision'"),
        ("model.freeze=[vit]", "model.freeze[0]='vit'"),
        ("model.freeze=[connector, vit]", "model.freeze[1]='vit'"),
    ],
)
def test_unknown_model_part_names_the_field_and_the_parts(override, field):
    # model.freeze and optimizer.lr_multipliers name parts of one Literal (ModelPart).
    with pytest.raises(ValueError) as info:
        _debug(override)
    message = str(info.value)
    assert message.startswith(field), message
    assert str(list(MODEL_PARTS)) in message


# ---- round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_save_then_load_round_trip(path, tmp_path):
    cfg = load_config(path)
    out = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert out.is_file()
    assert load_config(out) == cfg


def test_round_trip_keeps_overrides_and_none(tmp_path):
    cfg = _debug(
        "model.llm.num_query_groups=null",
        "optimizer.lr_multipliers.connector=2.5",
        "model.fp8=null",
        "checkpoint.save_dir=/tmp/x",
    )
    again = load_config(save_config(cfg, tmp_path / "c.yaml"))
    assert again == cfg
    assert again.model.llm.num_query_groups is None
    assert again.optimizer.lr_multipliers == {"connector": 2.5}


# ---- validation ------------------------------------------------------------------------

TE_FP8 = ["model.transformer_impl=transformer_engine", "model.fp8=hybrid"]
AUTO_FP8 = ["model.transformer_impl=auto", "model.fp8_on_gpu=hybrid"]

INVALID = [
    # (id, overrides on configs/debug.yaml, fields the message must name)
    (
        "tp_not_dividing_heads",
        ["parallel.tensor_parallel_size=3"],
        ["model.llm.num_attention_heads=4", "parallel.tensor_parallel_size=3"],
    ),
    (
        "tp_not_dividing_query_groups",
        ["parallel.tensor_parallel_size=4"],
        ["model.llm.num_query_groups=2", "parallel.tensor_parallel_size=4"],
    ),
    (
        "sp_without_tp",
        ["parallel.sequence_parallel=true"],
        ["parallel.sequence_parallel", "parallel.tensor_parallel_size"],
    ),
    (
        "experts_not_divisible_by_ep",
        ["model.llm.moe.num_experts=4", "parallel.expert_parallel_size=3"],
        ["model.llm.moe.num_experts=4", "parallel.expert_parallel_size=3"],
    ),
    (
        "top1_router_renormalised",
        [
            "model.llm.moe.num_experts=4",
            "model.llm.moe.top_k=1",
            "model.llm.moe.normalize_top_k=true",
        ],
        ["model.llm.moe.normalize_top_k=true", "model.llm.moe.top_k=1"],
    ),
    (
        "head_dim_odd",
        ["model.llm.head_dim=7"],
        ["model.llm.head_dim=7"],
    ),
    (
        "ep_on_dense_model",
        ["parallel.expert_parallel_size=2"],
        ["parallel.expert_parallel_size=2", "model.llm.moe.num_experts"],
    ),
    (
        "layers_not_divisible_by_pp",
        ["parallel.pipeline_parallel_size=3"],
        ["model.llm.num_layers=4", "parallel.pipeline_parallel_size=3"],
    ),
    (
        "connector_tokens_not_square",
        ["model.connector.num_output_tokens=8"],
        ["model.connector.num_output_tokens=8"],
    ),
    (
        "connector_tokens_exceed_patches",
        ["model.connector.num_output_tokens=25"],
        ["model.connector.num_output_tokens=25"],
    ),
    (
        "mlp_connector_wrong_token_count",
        ["model.connector.type=mlp"],
        ["model.connector.type=mlp", "model.connector.num_output_tokens=16"],
    ),
    (
        "image_not_multiple_of_patch",
        ["model.vision.image_size=50"],
        ["model.vision.image_size=50", "model.vision.patch_size=14"],
    ),
    (
        "vision_heads_not_dividing_hidden",
        ["model.vision.num_attention_heads=5"],
        ["model.vision.hidden_size", "model.vision.num_attention_heads=5"],
    ),
    ("image_mean_wrong_length", ["model.vision.image_mean=[0.5]"], ["model.vision.image_mean"]),
    ("fp8_without_te", ["model.fp8=hybrid"], ["model.fp8", "model.transformer_impl"]),
    (
        "dense_mask_reference_with_te",
        ["model.attention=dense_mask_reference", "model.transformer_impl=transformer_engine"],
        ["model.attention=dense_mask_reference", "model.transformer_impl=local"],
    ),
    ("fixed_lr_without_lr", ["optimizer.lr=null"], ["optimizer.lr_rule=fixed", "optimizer.lr"]),
    (
        "non_positive_lr_multiplier",
        ["optimizer.lr_multipliers.connector=0"],
        ["optimizer.lr_multipliers.connector"],
    ),
    ("min_lr_ratio_above_one", ["optimizer.min_lr_ratio=1.5"], ["optimizer.min_lr_ratio"]),
    (
        "seq_longer_than_max",
        ["training.seq_length=512"],
        ["training.seq_length=512", "model.llm.max_sequence_length=256"],
    ),
    ("seq_too_short_for_an_image", ["training.seq_length=10"], ["training.seq_length=10"]),
    ("bad_mixture_key", ["data.mixture.images=0.5"], ["data.mixture.images"]),
    ("negative_mixture_weight", ["data.mixture.text=-0.1"], ["data.mixture.text"]),
    (
        "top_k_above_num_experts",
        ["model.llm.moe.num_experts=2", "model.llm.moe.top_k=3"],
        ["model.llm.moe.top_k=3", "model.llm.moe.num_experts=2"],
    ),
    (
        "moe_layer_frequency_above_layers",
        ["model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=5"],
        ["model.llm.moe.layer_frequency=5"],
    ),
    (
        "query_groups_not_dividing_heads",
        ["model.llm.num_query_groups=3"],
        ["model.llm.num_query_groups=3"],
    ),
    (
        "global_batch_not_multiple_of_micro",
        ["training.global_batch_size=6"],
        ["training.global_batch_size=6", "training.micro_batch_size=4"],
    ),
    ("zero_train_steps", ["training.train_steps=0"], ["training.train_steps=0"]),
    (
        "zero_layers_on_vision_stage",
        ["parallel.pipeline_parallel_size=2", "parallel.num_decoder_layers_on_vision_stage=0"],
        ["parallel.num_decoder_layers_on_vision_stage=0"],
    ),
    (
        "uneven_rest_of_pipeline",
        ["parallel.pipeline_parallel_size=3", "parallel.num_decoder_layers_on_vision_stage=1"],
        ["model.llm.num_layers=4", "parallel.pipeline_parallel_size=3"],
    ),
    (
        "pinned_stages_do_not_add_up",
        [
            "parallel.pipeline_parallel_size=2",
            "parallel.num_decoder_layers_on_vision_stage=1",
            "parallel.num_decoder_layers_on_last_stage=2",
        ],
        ["parallel.pipeline_parallel_size=2", "model.llm.num_layers=4"],
    ),
    (
        "vision_stage_layers_without_pipeline",
        ["parallel.num_decoder_layers_on_vision_stage=2"],
        ["parallel.num_decoder_layers_on_vision_stage", "parallel.pipeline_parallel_size"],
    ),
    (
        "moe_with_tp_without_sp",
        ["model.llm.moe.num_experts=4", "parallel.tensor_parallel_size=2"],
        ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel"],
    ),
    (
        "save_interval_without_save_dir",
        ["checkpoint.save_interval=10"],
        ["checkpoint.save_interval", "checkpoint.save_dir"],
    ),
    # FP8 (docs/configuration.md, "GPU precision"): token counts, precision, eval.tasks.
    (
        "fp8_tokens_not_multiple_of_16",
        [*TE_FP8, "training.seq_length=250", "training.micro_batch_size=1"],
        ["model.fp8=hybrid", "training.seq_length=250", "training.micro_batch_size=1", "16"],
    ),
    (
        "fp8_tokens_per_rank_with_sequence_parallelism",
        [
            *TE_FP8,
            "training.seq_length=240",
            "training.micro_batch_size=1",
            "parallel.tensor_parallel_size=2",
            "parallel.sequence_parallel=true",
        ],
        ["training.seq_length=240", "parallel.tensor_parallel_size=2", "seq_length=224"],
    ),
    (
        "fp8_with_fp32_precision",
        [*TE_FP8, "training.precision=fp32"],
        ["model.fp8=hybrid", "training.precision=fp32", "training.precision=auto"],
    ),
    (
        "fp8_with_periodic_few_shot_eval",
        [*TE_FP8, "eval.interval=10", "eval.tasks=[synthetic_vqa]"],
        ["eval.tasks", "model.fp8=hybrid", "mm1 eval", "without FP8"],
    ),
    (
        "fp8_on_gpu_with_periodic_few_shot_eval",
        [*AUTO_FP8, "eval.interval=10", "eval.tasks=[synthetic_vqa]"],
        ["eval.tasks", "model.fp8_on_gpu=hybrid", "mm1 eval"],
    ),
    (
        "fp8_on_gpu_tokens_and_precision",
        [*AUTO_FP8, "training.seq_length=250", "training.precision=fp32"],
        ["model.fp8_on_gpu=hybrid", "training.seq_length=250", "training.precision=fp32"],
    ),
    (
        "fp8_on_gpu_with_local",
        ["model.fp8_on_gpu=hybrid"],
        ["model.fp8_on_gpu=hybrid", "model.transformer_impl=local", "transformer_impl=auto"],
    ),
    (
        "fp8_with_auto_points_to_fp8_on_gpu",
        ["model.transformer_impl=auto", "model.fp8=hybrid"],
        ["model.fp8", "model.transformer_impl=transformer_engine", "model.fp8_on_gpu"],
    ),
    (
        "fp8_and_fp8_on_gpu_both_set",
        [*TE_FP8, "model.fp8_on_gpu=e4m3"],
        ["model.fp8=hybrid", "model.fp8_on_gpu=e4m3"],
    ),
    (
        "dense_mask_reference_with_auto",
        ["model.attention=dense_mask_reference", "model.transformer_impl=auto"],
        ["model.attention=dense_mask_reference", "model.transformer_impl=local"],
    ),
]


@pytest.mark.parametrize(
    "overrides, fields", [(o, f) for _, o, f in INVALID], ids=[name for name, _, _ in INVALID]
)
def test_invalid_config_message_names_the_field(overrides, fields):
    message = _validation_error(*overrides)
    assert message.startswith("Invalid configuration:")
    for field in fields:
        assert field in message, f"{field!r} not in {message!r}"


def test_debug_config_is_valid_baseline():
    # The table above starts from debug.yaml; each row must fail because of its override.
    validate_config(_debug())


def test_all_errors_reported_in_one_message():
    message = _validation_error(
        "parallel.sequence_parallel=true",
        "model.vision.image_size=50",
        "optimizer.lr_multipliers.connector=0",
        "data.mixture.images=1.0",
        "training.train_steps=0",
    )
    bullets = [line for line in message.splitlines() if line.strip().startswith("- ")]
    assert len(bullets) == 5, message
    for field in (
        "parallel.sequence_parallel",
        "model.vision.image_size",
        "optimizer.lr_multipliers.connector",
        "data.mixture.images",
        "training.train_steps",
    ):
        assert sum(field in b for b in bullets) == 1, (field, message)


def test_tp_violation_lists_every_offender():
    message = _validation_error("parallel.tensor_parallel_size=3")
    assert "model.llm.num_attention_heads=4" in message
    assert "model.vision.num_attention_heads=4" in message
    assert "model.llm.num_query_groups=2" in message


def test_valid_parallel_and_moe_settings_pass():
    validate_config(
        _debug(
            "parallel.tensor_parallel_size=2",
            "parallel.sequence_parallel=true",
            "parallel.pipeline_parallel_size=2",
        )
    )
    validate_config(
        _debug(
            "model.llm.moe.num_experts=4",
            "parallel.expert_parallel_size=2",
            "model.llm.moe.layer_frequency=2",
        )
    )
    validate_config(_debug("model.connector.type=mlp", "model.connector.num_output_tokens=16"))
    validate_config(_debug("optimizer.lr_rule=mm1", "optimizer.lr=null"))


def test_attn_pool_with_zero_heads_is_rejected():
    message = _validation_error(
        "model.connector.type=attn_pool", "model.connector.num_attention_heads=0"
    )
    assert "model.connector.num_attention_heads" in message


# ---- world size ------------------------------------------------------------------------


def test_world_size_not_divisible_shows_arithmetic():
    par = ParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2)
    with pytest.raises(ValueError) as info:
        check_world_size(par, 12)
    message = str(info.value)
    assert "world size 12" in message
    assert "4 x 2 = 8" in message


@pytest.mark.parametrize(
    "tp, pp, world, dp", [(1, 1, 1, 1), (2, 1, 8, 4), (2, 2, 16, 4), (4, 8, 32, 1)]
)
def test_world_size_returns_data_parallel_size(tp, pp, world, dp):
    par = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert check_world_size(par, world) == dp


def test_world_size_expert_parallel_must_fit():
    par = ParallelConfig(expert_parallel_size=3)
    with pytest.raises(ValueError) as info:
        check_world_size(par, 8)
    assert "3 x 1" in str(info.value)
    assert check_world_size(ParallelConfig(expert_parallel_size=4), 8) == 8


def test_mm1_30b_worked_example_fits_eight_nodes_of_eight_gpus():
    from mm1_megatron.config import load_config

    cfg = validate_config(load_config(Path(__file__).resolve().parents[2] / "configs/mm1_30b.yaml"))
    assert check_world_size(cfg.parallel, 64) == 4  # TP 4 x PP 4 x DP 4
    assert (
        cfg.parallel.num_decoder_layers_on_vision_stage
        + 2 * 15
        + cfg.parallel.num_decoder_layers_on_last_stage
    ) == cfg.model.llm.num_layers


def test_fp8_problems_are_reported_at_once():
    message = _validation_error(
        *TE_FP8,
        "training.seq_length=250",
        "training.micro_batch_size=1",
        "training.precision=fp32",
        "eval.interval=10",
        "eval.tasks=[synthetic_vqa]",
    )
    assert message.count("model.fp8=hybrid") == 3, message


@pytest.mark.parametrize(
    "overrides",
    [
        # Another engineer makes TE decode work: few-shot eval with TE in bf16 is allowed.
        ["model.transformer_impl=transformer_engine", "eval.interval=10", "eval.tasks=[x]"],
        # 256 x 4 tokens, and 240 x 1 / TP 1 without sequence parallelism.
        TE_FP8,
        [*TE_FP8, "training.seq_length=240", "training.micro_batch_size=1"],
        [*TE_FP8, "parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
        [*TE_FP8, "eval.tasks=[synthetic_vqa]"],  # eval.interval=0: the tasks never run
        AUTO_FP8,
        ["model.transformer_impl=transformer_engine", "model.fp8_on_gpu=e4m3"],
        ["model.transformer_impl=auto"],
        # Checked again once auto is resolved (tests/unit/test_machine_settings.py).
        [
            "model.transformer_impl=auto",
            "model.llm.moe.num_experts=4",
            "model.llm.moe.grouped_gemm=true",
        ],
    ],
)
def test_valid_fp8_and_auto_settings(overrides):
    validate_config(_debug(*overrides))


def test_fp8_reaches_the_decoder_only(tiny_config):
    """FP8 GEMMs need token counts divisible by 8; a ViT batch (730 tokens per ViT-H/14-378
    image times the image count) is not, so the ViT and connector stay in bf16."""
    from mm1_megatron.models.transformer_configs import (
        RuntimeOptions,
        language_transformer_config,
        vision_transformer_config,
    )

    cfg = tiny_config()
    cfg.model.fp8, cfg.model.fp8_recipe = "hybrid", "delayed"
    runtime = RuntimeOptions(params_dtype=torch.bfloat16)
    assert language_transformer_config(cfg.model, cfg.parallel, runtime).fp8 == "hybrid"
    assert vision_transformer_config(cfg.model, cfg.parallel, runtime).fp8 is None


def test_config_files_stack_left_to_right(tmp_path):
    from mm1_megatron.config import load_config

    overlay = tmp_path / "cluster.yaml"
    overlay.write_text(
        "training:\n  train_steps: 7\n  micro_batch_size: 2\n"
        "parallel:\n  collective_timeout_minutes: 45\n"
    )
    second = tmp_path / "experiment.yaml"
    second.write_text("training:\n  train_steps: 9\n")
    base = load_config(DEBUG)
    cfg = load_config([DEBUG, overlay, second], ["training.micro_batch_size=4"])
    assert cfg.training.train_steps == 9  # the last file wins
    assert cfg.training.micro_batch_size == 4  # overrides come last
    assert cfg.parallel.collective_timeout_minutes == 45.0  # merged, not replaced
    assert cfg.training.seq_length == base.training.seq_length
    assert cfg.model == base.model


@pytest.mark.parametrize("name", [p.name for p in sorted(CONFIG_DIR.glob("*.yaml"))])
def test_resolved_config_matches_its_snapshot(name):
    """A changed default or include changes a shipped config: regenerate the snapshots
    on purpose with ``python -m tests.golden.config_snapshots`` and review the diff."""
    import difflib

    from tests.golden.config_snapshots import SNAPSHOT_DIR, resolved_text

    snapshot = SNAPSHOT_DIR / name
    assert snapshot.is_file(), f"no snapshot for configs/{name}"
    expected, actual = snapshot.read_text(), resolved_text(CONFIG_DIR / name)
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True),
            actual.splitlines(True),
            f"snapshot/{name}",
            f"resolved/{name}",
        )
    )
    assert not diff, diff


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.connector.type=qformer", "model.connector.type='qformer' is not one of"),
        ("model.connector.type=5", "model.connector.type=5 is not one of"),
        ("model.fp8=e5m2", "model.fp8='e5m2' is not one of ['hybrid', 'e4m3']"),
        ("training.precision=fp16", "training.precision='fp16' is not one of"),
        ("parallel.recompute=partial", "parallel.recompute='partial' is not one of"),
        ("checkpoint.optimizer_sharding=zero3", "checkpoint.optimizer_sharding='zero3'"),
        ("data.images.resize=cropp", "did you mean 'crop'?"),
    ],
)
def test_unknown_choice_is_refused_when_loaded(override, message):
    """Each choice is a Literal in the schema: one list, checked by the loader."""
    with pytest.raises(ValueError, match=re.escape(message)):
        _debug(override)


def test_choices_of_configs_built_in_code_are_validated_too():
    cfg = _debug()
    cfg.model.connector.type = "qformer"
    cfg.training.precision = "fp16"
    message = _validation_error_of(cfg)
    assert "model.connector.type='qformer' is not one of" in message
    assert "training.precision='fp16' is not one of" in message


def test_model_parts_of_configs_built_in_code_are_validated_too():
    cfg = _debug()
    cfg.model.freeze = ["connector", "vit"]
    cfg.optimizer.lr_multipliers = {"vision": 2.0}
    message = _validation_error_of(cfg)
    parts = str(list(MODEL_PARTS))
    assert f"model.freeze[1]='vit' is not one of {parts}" in message
    assert f"optimizer.lr_multipliers.vision: 'vision' is not one of {parts}" in message


def _validation_error_of(cfg) -> str:
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    return str(info.value)
