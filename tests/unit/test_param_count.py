"""``count_parameters`` against built models, a hand formula, and the YAML headers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mm1_megatron.config import load_config
from mm1_megatron.models.param_count import count_parameters

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))

VARIANTS = {
    "baseline_c_abstractor_gqa": [],
    "c_abstractor_no_blocks": ["model.connector.num_blocks_per_stage=0"],
    "c_abstractor_two_blocks": [
        "model.connector.num_blocks_per_stage=2",
        "model.connector.hidden_size=24",
    ],
    "c_abstractor_one_token": ["model.connector.num_output_tokens=1"],
    "avg_pool": ["model.connector.type=avg_pool"],
    "avg_pool_readout_3": ["model.connector.type=avg_pool", "model.connector.num_readout_layers=3"],
    "attn_pool": [
        "model.connector.type=attn_pool",
        "model.connector.hidden_size=48",
        "model.connector.num_attention_heads=4",
    ],
    "attn_pool_same_width": ["model.connector.type=attn_pool", "model.connector.hidden_size=32"],
    "mlp": [
        "model.connector.type=mlp",
        "model.connector.num_output_tokens=16",
        "model.connector.num_readout_layers=1",
    ],
    "mha": ["model.llm.num_query_groups=null"],
    "mqa": ["model.llm.num_query_groups=1"],
    "tied_embeddings": ["model.llm.tie_embeddings=true"],
    "qkv_bias": ["model.llm.qkv_bias=true"],
    "qwen3_attention": ["model.llm.qk_norm=true", "model.llm.head_dim=12"],
    "qwen3_moe_untied_norms": [
        "model.llm.qk_norm=true",
        "model.llm.head_dim=20",
        "model.llm.moe.num_experts=4",
        "model.llm.moe.normalize_top_k=false",
    ],
    "no_class_token": ["model.vision.use_class_token=false"],
    "siglip_stem": [
        "model.vision.use_class_token=false",
        "model.vision.patch_embedding_bias=true",
        "model.vision.pre_layernorm=false",
        "model.vision.post_layernorm=true",
        "model.vision.activation=gelu_tanh",
    ],
    "small_patches": ["model.vision.patch_size=7", "model.connector.num_output_tokens=16"],
    "moe_every_2nd": ["model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2"],
    "moe_every_layer_top3_small_experts": [
        "model.llm.moe.num_experts=4",
        "model.llm.moe.top_k=3",
        "model.llm.moe.expert_ffn_hidden_size=48",
    ],
    "moe_tied_mha": [
        "model.llm.moe.num_experts=2",
        "model.llm.tie_embeddings=true",
        "model.llm.num_query_groups=null",
        "model.llm.num_layers=3",
        "model.llm.moe.layer_frequency=2",
    ],
}


def _numel(module) -> int:
    # named_parameters() de-duplicates shared tensors (tied embeddings).
    return sum(p.numel() for _, p in module.named_parameters())


@pytest.mark.parametrize("overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_counts_equal_built_model(overrides, tiny_config, build_tiny_model):
    cfg = tiny_config(*overrides)
    model = build_tiny_model(cfg)
    counts = count_parameters(cfg.model)
    assert counts.vision_encoder == _numel(model.vision_encoder)
    assert counts.connector == _numel(model.connector)
    assert counts.language_model == _numel(model.language_model)
    assert counts.total == _numel(model)

    lm = dict(model.language_model.named_parameters())
    embedding = lm["embedding.word_embeddings.weight"].numel()
    if "output_layer.weight" in lm:
        embedding += lm["output_layer.weight"].numel()
    assert counts.llm_embedding == embedding
    assert counts.llm_non_embedding == counts.language_model - embedding


def test_moe_top1_builds(tiny_config, build_tiny_model):
    cfg = tiny_config("model.llm.moe.num_experts=4", "model.llm.moe.top_k=1")
    model = build_tiny_model(cfg)
    assert count_parameters(cfg.model).language_model == _numel(model.language_model)


def test_tied_embeddings_share_one_tensor(tiny_config, build_tiny_model):
    cfg = tiny_config("model.llm.tie_embeddings=true")
    model = build_tiny_model(cfg)
    names = [n for n, _ in model.language_model.named_parameters()]
    assert "output_layer.weight" not in names
    untied = count_parameters(tiny_config().model)
    tied = count_parameters(cfg.model)
    h, v = cfg.model.llm.hidden_size, cfg.model.llm.vocab_size
    assert untied.language_model - tied.language_model == h * v


def _moe_active_from_model(model, cfg) -> int:
    """Active LLM params measured on the built model: drop the unused experts' weights."""
    moe = cfg.model.llm.moe
    params = dict(model.language_model.named_parameters())
    per_layer_expert = {}
    for name, p in params.items():
        match = re.match(r"decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.", name)
        if match:
            key = (int(match.group(1)), int(match.group(2)))
            per_layer_expert[key] = per_layer_expert.get(key, 0) + p.numel()
    moe_layers = sorted({layer for layer, _ in per_layer_expert})
    assert moe_layers == list(range(0, cfg.model.llm.num_layers, moe.layer_frequency))
    unused = 0
    for layer in moe_layers:
        sizes = [per_layer_expert[(layer, e)] for e in range(moe.num_experts)]
        assert len(set(sizes)) == 1
        unused += (moe.num_experts - moe.top_k) * sizes[0]
    return _numel(model.language_model) - unused


@pytest.mark.parametrize(
    "variant", ["moe_every_2nd", "moe_every_layer_top3_small_experts", "moe_tied_mha"]
)
def test_moe_active_equals_built_model_minus_unused_experts(variant, tiny_config, build_tiny_model):
    cfg = tiny_config(*VARIANTS[variant])
    model = build_tiny_model(cfg)
    assert count_parameters(cfg.model).llm_active == _moe_active_from_model(model, cfg)


def test_moe_active_hand_formula(tiny_config):
    # h=32, 4 heads of 8 in 2 query groups, ffn 64, vocab 256, 2 layers, 4 experts top-2,
    # MoE on layer 0 only (layer_frequency=2).
    cfg = tiny_config("model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2")
    h, ffn, vocab = 32, 64, 256
    attention = h + h * (4 + 2 * 2) * 8 + 4 * 8 * h  # norm, fused QKV, out proj
    assert attention == 3104
    swiglu = 2 * ffn * h + ffn * h  # fc1 (gate+up), fc2
    dense_layer = attention + h + swiglu  # + pre-MLP norm
    moe_layer_active = attention + h + 4 * h + 2 * swiglu  # norm, router, top-2 experts
    moe_layer_total = attention + h + 4 * h + 4 * swiglu
    embedding = 2 * vocab * h
    final_norm = h
    counts = count_parameters(cfg.model)
    assert counts.llm_active == dense_layer + moe_layer_active + embedding + final_norm == 41248
    assert counts.language_model == dense_layer + moe_layer_total + embedding + final_norm
    assert counts.llm_embedding == embedding
    assert counts.llm_active_non_embedding == 41248 - embedding
    # Dense models: everything is active.
    dense = count_parameters(tiny_config().model)
    assert dense.llm_active == dense.language_model


def test_dense_decoder_hand_formula_with_gqa(tiny_config):
    cfg = tiny_config()
    h, ffn, vocab, layers = 32, 64, 256, 2
    per_layer = h + h * (4 * 8 + 2 * 2 * 8) + 4 * 8 * h + h + 3 * h * ffn
    assert count_parameters(cfg.model).language_model == layers * per_layer + 2 * vocab * h + h


HEADER = re.compile(
    r"^#\s*Parameters:\s*total\s+(?P<total>[\d,]+)\s*"
    r"\(vision encoder (?P<vision>[\d,]+), connector (?P<connector>[\d,]+), "
    r"language model (?P<llm>[\d,]+); LLM active non-embedding (?P<active>[\d,]+)\)",
    re.MULTILINE,
)


def _header(path: Path) -> dict:
    head = "\n".join(path.read_text().splitlines()[:5])
    match = HEADER.search(head)
    assert match, f"{path.name}: no '# Parameters: total N,NNN,... (...)' line in its header"
    return {k: int(v.replace(",", "")) for k, v in match.groupdict().items()}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_yaml_header_documents_exact_parameter_count(path):
    documented = _header(path)
    counts = count_parameters(load_config(path).model)
    assert documented["total"] == counts.total
    assert documented["vision"] == counts.vision_encoder
    assert documented["connector"] == counts.connector
    assert documented["llm"] == counts.language_model
    assert documented["active"] == counts.llm_active_non_embedding
    assert documented["vision"] + documented["connector"] + documented["llm"] == documented["total"]


def test_header_numbers_use_thousands_separators():
    for path in SHIPPED:
        line = next(x for x in path.read_text().splitlines()[:5] if "Parameters:" in x)
        total = re.search(r"total ([\d,]+)", line).group(1)
        assert total == f"{int(total.replace(',', '')):,}", path.name


def test_debug_config_counts_match_built_model(build_tiny_model):
    cfg = load_config(CONFIG_DIR / "debug.yaml")
    model = build_tiny_model(cfg)
    assert count_parameters(cfg.model).total == _numel(model)


def test_vit_h_encoder_size():
    # ViT-H/14 at 378 px (CLIP layout, no post-LayerNorm/projection) is ~631M parameters.
    counts = count_parameters(load_config(CONFIG_DIR / "mm1_3b.yaml").model)
    h, f, layers, patches = 1280, 5120, 32, 27 * 27
    per_layer = 4 * h + 4 * h * h + 4 * h + 2 * h * f + f + h
    assert (
        counts.vision_encoder
        == 3 * 14 * 14 * h + h + (patches + 1) * h + 2 * h + layers * per_layer
    )


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_peak_flops_follow_the_gpu_model(name, peak):
    from mm1_megatron.training.flops import dense_bf16_peak_flops

    assert dense_bf16_peak_flops(name) == peak
