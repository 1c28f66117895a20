"""LoRA adapters (``models/lora.py``) in one process: the forward pass against the merged
weights and against the formula, what trains, initialisation, checkpoint sharding, the
Transformer Engine output contract, and the config checks. Layouts: tests/parallel/
test_lora_layouts.py; checkpoints of LoRA runs: tests/checkpoint/test_lora_checkpoints.py."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch.contract import position_ids_from_documents
from mm1_megatron.config.schema import LoRAConfig
from mm1_megatron.models.lora import (
    add_adapter,
    has_adapter,
    is_adapter_key,
    merge_adapter,
    merge_adapters,
    merged_weight,
)
from tests.conftest import IMAGE_TOKEN_ID

ALL_PARTS = "model.lora.parts=[vision_encoder,connector,language_model]"


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, 256, (2, 24), generator=gen)
    tokens[:, 2:6] = IMAGE_TOKEN_ID  # 4 connector tokens per image
    docs = torch.zeros_like(tokens)
    docs[:, 14:] = 1
    images = torch.randn(2, 3, 56, 56, generator=gen)
    return tokens, position_ids_from_documents(docs), docs, images


def _logits(model, inputs):
    tokens, positions, docs, images = inputs
    with torch.no_grad():
        return model(tokens, positions, docs, images=images)


def _randomise_b(model, seed: int = 1) -> int:
    gen = torch.Generator().manual_seed(seed)
    adapted = [m for m in model.modules() if has_adapter(m)]
    for module in adapted:
        with torch.no_grad():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.05)
    return len(adapted)


@pytest.fixture
def lora_model(tiny_config, build_tiny_model):
    def _build(*overrides: str):
        model = build_tiny_model(tiny_config("model.lora.rank=4", *overrides))
        return model.eval()

    return _build


def test_adapter_forward_equals_merged_forward(lora_model):
    model = lora_model(ALL_PARTS)
    inputs = _inputs()
    base = _logits(model, inputs)  # B = 0
    # ViT: 1 layer x 4 linears; decoder: 2 x 4; connector: its readout's 2 Linears.
    assert _randomise_b(model) == 4 + 8 + 2
    adapted = _logits(model, inputs)
    assert (adapted - base).abs().max() > 1e-2  # the adapters do change the model
    assert merge_adapters(model) == 14
    assert not any(has_adapter(m) for m in model.modules())
    assert not any(is_adapter_key(n) for n in model.state_dict())
    merged = _logits(model, inputs)
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-6)


def test_fresh_adapters_leave_the_base_model_unchanged(tiny_config, build_tiny_model):
    base = build_tiny_model(tiny_config()).eval()
    adapted = build_tiny_model(tiny_config("model.lora.rank=4", ALL_PARTS)).eval()
    base_state = base.state_dict()
    for key, value in adapted.state_dict().items():
        if isinstance(value, torch.Tensor) and not is_adapter_key(key):  # not extra state
            assert torch.equal(value, base_state[key]), key
    inputs = _inputs()
    torch.testing.assert_close(_logits(adapted, inputs), _logits(base, inputs), rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        [ALL_PARTS],
        [ALL_PARTS, "model.connector.type=attn_pool", "model.connector.num_attention_heads=2"],
        [ALL_PARTS, "model.connector.type=mlp", "model.connector.num_output_tokens=16"],
        ["model.llm.moe.num_experts=4", "model.lora.target_modules=[linear_qkv,linear_fc2]"],
        ["model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2"],
    ],
    ids=["decoder", "all_parts", "attn_pool", "mlp_connector", "moe_some_targets", "moe"],
)
def test_adapter_count_equals_the_closed_form(overrides, tiny_config, build_tiny_model):
    from mm1_megatron.models.param_count import lora_parameters

    cfg = tiny_config("model.lora.rank=4", *overrides)
    model = build_tiny_model(cfg)
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter_key(n))
    assert adapters > 0 and lora_parameters(cfg.model) == adapters


def test_only_adapters_and_fully_trained_parts_train(tiny_config, build_tiny_model):
    cfg = tiny_config("model.lora.rank=4", "model.lora.parts=[vision_encoder,language_model]")
    model = build_tiny_model(cfg)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(is_adapter_key(n) for n in trained)
    assert {n.split(".")[0] for n in trained} == {"vision_encoder", "language_model"}

    cfg = tiny_config("model.lora.rank=4", "model.lora.fully_trained=[connector]")
    model = build_tiny_model(cfg)
    for name, param in model.named_parameters():
        expected = name.startswith("connector.") or is_adapter_key(name)
        assert param.requires_grad == expected, name
    assert not any(
        n.startswith("vision_encoder.") and is_adapter_key(n) for n, _ in model.named_parameters()
    )


def test_adapters_are_drawn_by_name_not_by_the_model_seed(tiny_config, build_tiny_model):
    cfg = tiny_config("model.lora.rank=4")
    one, other = build_tiny_model(cfg, seed=1), build_tiny_model(cfg, seed=2)
    a_one = {n: p for n, p in one.named_parameters() if n.endswith("lora_a")}
    a_other = {n: p for n, p in other.named_parameters() if n.endswith("lora_a")}
    assert a_one.keys() == a_other.keys() and len(a_one) == 8
    for name, value in a_one.items():
        assert torch.equal(value, a_other[name]), name
        bound = 1 / value.shape[1] ** 0.5  # PEFT's Kaiming-uniform bound, fan-in
        assert 0.5 * bound < value.abs().max() <= bound
    distinct = {tuple(v.flatten()[:4].tolist()) for v in a_one.values()}
    assert len(distinct) == len(a_one)  # each layer its own draw
    assert all(not p.any() for n, p in one.named_parameters() if n.endswith("lora_b"))


def test_linear_adapter_is_the_formula(megatron_single_process):
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    weight, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    add_adapter(layer, LoRAConfig(rank=3, alpha=6.0), seed=0, name="connector.net.x")
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    expected = x @ weight.T + bias + 2.0 * (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer(x), expected)
    merged = merged_weight(weight, layer.lora_a, layer.lora_b, 2.0)
    merge_adapter(layer)
    assert type(layer) is torch.nn.Linear
    torch.testing.assert_close(layer.weight, merged)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


class FakeTELayerNormColumnParallelLinear(torch.nn.Module):
    """Megatron-Core's wrapper of Transformer Engine's LayerNormLinear, as it returns:
    ``(out, None)``; ``((out, normalised), None)`` with ``return_layernorm_output``; and
    ``(out, bias, normalised)`` when it also returns its bias (``te_return_bias``)."""

    def __init__(self, features: int, out: int, *, te_return_bias: bool):
        super().__init__()
        self.norm = torch.nn.LayerNorm(features)
        self.weight = torch.nn.Parameter(torch.randn(out, features))
        self.return_layernorm_output = False
        self.te_return_bias = te_return_bias

    def forward(self, x):
        normalised = self.norm(x)
        out = normalised @ self.weight.T
        if self.te_return_bias:
            bias = torch.zeros(out.shape[-1])
            return (out, bias, normalised) if self.return_layernorm_output else (out, bias)
        return ((out, normalised) if self.return_layernorm_output else out), None


@pytest.mark.parametrize("te_return_bias", [False, True])
def test_fused_norm_linear_adapter_reads_the_normalised_input(
    megatron_single_process, te_return_bias
):
    torch.manual_seed(0)
    layer = FakeTELayerNormColumnParallelLinear(6, 4, te_return_bias=te_return_bias)
    add_adapter(layer, LoRAConfig(rank=2, alpha=2.0), seed=0, name="l.linear_qkv")
    assert layer.return_layernorm_output  # asked of TE, so the adapter gets norm(x)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 6)
    out, _ = layer(x)
    normalised = layer.norm(x)
    expected = normalised @ layer.weight.T + (normalised @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(out, expected)


def test_grouped_experts_are_refused(megatron_single_process):
    class TEColumnParallelGroupedLinear(torch.nn.Module):
        weight = torch.nn.Parameter(torch.zeros(2, 2))

    with pytest.raises(ValueError, match="grouped_gemm=false"):
        add_adapter(TEColumnParallelGroupedLinear(), LoRAConfig(rank=2), seed=0, name="x")


def test_checkpoint_shards_the_split_factor_like_its_weight(lora_model):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    model = lora_model()
    sharded = model.sharded_state_dict()
    layer = "language_model.decoder.layers.1."
    qkv_b = sharded[layer + "self_attention.linear_qkv.lora_b"]
    qkv_w = sharded[layer + "self_attention.linear_qkv.weight"]
    assert isinstance(qkv_b, ShardedTensor)
    assert qkv_b.key == qkv_w.key.replace("weight", "lora_b")
    assert qkv_b.global_shape[:-1] == qkv_w.global_shape[:-1] and qkv_b.global_shape[-1] == 4
    assert qkv_b.axis_fragmentations == qkv_w.axis_fragmentations
    proj_a = sharded[layer + "self_attention.linear_proj.lora_a"]
    assert proj_a.global_shape[-2:] == (4, qkv_w.global_shape[-1])  # after the layer axis
    # The gated linear_fc1's B is saved in [gate; up] halves, as its weight.
    assert isinstance(sharded[layer + "mlp.linear_fc1.lora_b"], ShardedTensorFactory)
    assert isinstance(sharded[layer + "mlp.linear_fc1.weight"], ShardedTensorFactory)
    # The vision encoder's MLP is not gated.
    vision_fc1 = "vision_encoder.transformer.layers.0.mlp.linear_fc1."
    assert isinstance(sharded.get(vision_fc1 + "lora_b", None), (type(None), ShardedTensor))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.lora.rank=-1"], "model.lora.rank=-1 must be >= 0"),
        (["model.lora.rank=4", "model.lora.alpha=0"], "model.lora.alpha=0"),
        (["model.lora.rank=4", "model.lora.dropout=1"], "model.lora.dropout=1"),
        (["model.lora.rank=4", "model.lora.parts=[]"], "model.lora.parts is empty"),
        (["model.lora.rank=4", "model.lora.parts=[decoder]"], "model.lora.parts[0]"),
        (["model.lora.rank=4", "model.lora.target_modules=[q_proj]"], "target_modules[0]"),
        (
            ["model.lora.rank=4", "model.lora.fully_trained=[language_model]"],
            "in both model.lora.parts and model.lora.fully_trained",
        ),
        (["model.lora.fully_trained=[connector]"], "fully_trained has no effect"),
        (["model.lora.rank=4", "model.freeze=[language_model]"], "leave model.freeze empty"),
        (["model.lora.rank=4", "model.lora.target_modules=[]"], "no layer would get an adapter"),
        (
            [
                "model.lora.rank=4",
                "model.llm.moe.num_experts=4",
                "parallel.tensor_parallel_size=2",
                "parallel.sequence_parallel=true",
                "parallel.expert_tensor_parallel_size=1",
            ],
            "needs parallel.expert_tensor_parallel_size equal to",
        ),
        (
            ["model.lora.rank=4", "checkpoint.save_dir=/tmp/x"],
            "set checkpoint.initial_weights to the base",
        ),
        (
            [
                "model.lora.rank=4",
                "model.llm.moe.num_experts=4",
                "model.llm.moe.grouped_gemm=true",
            ],
            "cannot adapt grouped-GEMM experts",
        ),
    ],
)
def test_config_checks_name_the_field_and_the_fix(tiny_config, overrides, message):
    with pytest.raises(ValueError) as info:
        tiny_config(*overrides)
    assert message in str(info.value)
