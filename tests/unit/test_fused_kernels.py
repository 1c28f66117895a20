"""The GPU build choices: fused kernels and where weights are first drawn.

The fused SwiGLU, bias-dropout-add and vocab-parallel cross-entropy are Megatron-Core's
jit kernels, which also run on CPU: a model built with them must give the loss and the
gradients of the unfused model (the reference) to float rounding."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch import model_inputs, run_model
from mm1_megatron.config import validate_environment
from mm1_megatron.data.build import build_run_data, resolve_num_workers
from mm1_megatron.models import RuntimeOptions, build_mm1_model
from mm1_megatron.models.transformer_configs import language_transformer_config
from mm1_megatron.training.runtime import resolve_build_choices, resolve_init_device
from tests.conftest import IMAGE_TOKEN_ID, make_tiny_config


def _loss_and_grads(cfg, runtime, seeded, batch):
    seeded(5)
    model = build_mm1_model(
        cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID, runtime=runtime, init_seed=5
    )
    inputs = model_inputs(batch, torch.device("cpu"))
    per_token = run_model(model, inputs)
    loss = (per_token * inputs["loss_mask"]).sum() / inputs["loss_mask"].sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True])
def test_fused_kernels_give_the_unfused_loss_and_gradients(seeded, moe):
    extra = ["model.llm.moe.num_experts=4"] if moe else []
    cfg = make_tiny_config("training.micro_batch_size=2", *extra)
    loader, _ = build_run_data(cfg)
    batch = next(loader)
    loss_ref, grads_ref = _loss_and_grads(cfg, RuntimeOptions(), seeded, batch)
    loss, grads = _loss_and_grads(cfg, RuntimeOptions(fused_kernels=True), seeded, batch)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=0)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_model_really_uses_the_fused_kernels(seeded):
    cfg = make_tiny_config()
    model = build_mm1_model(
        cfg.model,
        cfg.parallel,
        image_token_id=IMAGE_TOKEN_ID,
        runtime=RuntimeOptions(fused_kernels=True),
    )
    config = model.language_model.config
    assert config.bias_activation_fusion and config.bias_dropout_fusion
    assert not model.vision_encoder.config.bias_activation_fusion  # tanh-GELU only
    # The fused cross-entropy hands back bf16 gradients: bf16 runs only.
    assert not config.cross_entropy_loss_fusion
    bf16 = RuntimeOptions(fused_kernels=True, params_dtype=torch.bfloat16)
    assert language_transformer_config(cfg.model, cfg.parallel, bf16).cross_entropy_loss_fusion


@pytest.mark.parametrize(
    "settings, cuda, fused",
    [([], False, False), ([], True, True), (["training.fused_kernels=false"], True, False)],
)
def test_fused_kernels_default_on_with_cuda_only(settings, cuda, fused):
    choices = resolve_build_choices(
        make_tiny_config(*settings), cuda=cuda, bf16=cuda, resuming=False
    )
    assert choices.runtime.fused_kernels is fused
    # Neither Transformer Engine nor apex is installed here: their fusions stay off.
    assert not choices.runtime.apply_rope_fusion
    assert not choices.runtime.gradient_accumulation_fusion
    assert choices.runtime.params_dtype == (torch.bfloat16 if cuda else torch.float32)


@pytest.mark.parametrize(
    "setting, cuda, resuming, expected",
    [
        ("auto", False, True, "cpu"),
        ("auto", True, False, "cpu"),
        ("auto", True, True, "gpu"),
        ("cpu", True, True, "cpu"),
        ("gpu", True, False, "gpu"),
    ],
)
def test_weights_are_drawn_on_the_gpu_only_when_a_checkpoint_replaces_them(
    setting, cuda, resuming, expected
):
    assert resolve_init_device(setting, cuda=cuda, resuming=resuming) == expected


def test_gpu_initialisation_gives_up_the_layout_independent_seed():
    cfg = make_tiny_config("training.init_device=gpu")
    choices = resolve_build_choices(cfg, cuda=True, bf16=True, resuming=False)
    assert choices.init_seed is None and not choices.runtime.use_cpu_initialization
    fresh = resolve_build_choices(make_tiny_config(), cuda=True, bf16=True, resuming=False)
    assert fresh.init_seed == 1234 and fresh.runtime.use_cpu_initialization


def test_gpu_initialisation_on_a_machine_without_one_is_refused():
    with pytest.raises(ValueError, match="training.init_device=gpu needs a GPU"):
        validate_environment(make_tiny_config("training.init_device=gpu"), cuda_available=False)


def test_grouped_gemm_without_transformer_engine_is_refused():
    with pytest.raises(ValueError, match="grouped_gemm=true needs Transformer Engine"):
        make_tiny_config("model.llm.moe.num_experts=4", "model.llm.moe.grouped_gemm=true")


@pytest.mark.parametrize(
    "setting, cuda, expected", [(None, True, 2), (None, False, 0), (3, False, 3)]
)
def test_data_workers_default_to_two_with_cuda_and_none_on_cpu(setting, cuda, expected):
    assert resolve_num_workers(setting, cuda=cuda) == expected


@pytest.mark.slow
def test_the_vit_quick_gelu_is_compiled_only_with_fused_kernels():
    # Megatron-Core's quick_gelu runs under torch.compile; on CPU (no fused kernels) the
    # eager function takes its place: the same values, no C++ compile in every process.
    from megatron.core.activations import quick_gelu

    from mm1_megatron.models.transformer_configs import vision_activation

    eager = vision_activation("quick_gelu", fused_kernels=False)
    assert eager is not quick_gelu
    assert vision_activation("quick_gelu", fused_kernels=True) is quick_gelu
    x = torch.randn(64, 32)
    torch.testing.assert_close(eager(x), x * torch.sigmoid(1.702 * x), rtol=0, atol=0)
    torch.testing.assert_close(quick_gelu(x), eager(x))
