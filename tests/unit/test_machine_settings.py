"""What a start decides for this machine: ``model.transformer_impl=auto`` and
``model.fp8_on_gpu`` (resolved once, saved resolved), the fused cross-entropy kernel, and
how the tools that read ``transformer_impl`` before a start treat ``auto``."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from mm1_megatron.config import load_config, save_config, validate_config
from mm1_megatron.training import runtime
from mm1_megatron.training.runtime import resolve_build_choices, resolve_machine_settings

REPO = Path(__file__).resolve().parents[2]
H100, A100 = (9, 0), (8, 0)


def _config(name="debug.yaml", *overrides):
    return validate_config(load_config(REPO / "configs" / name, list(overrides)))


def _resolve(cfg, *, cuda=True, capability=H100, te="2.14.0"):
    return resolve_machine_settings(cfg, cuda=cuda, cuda_capability=capability, te_version=te)


@pytest.mark.parametrize(
    "cuda, te, impl, line",
    [
        (True, "2.14.0", "transformer_engine", "-> transformer_engine (TE 2.14.0, CUDA)"),
        (False, "2.14.0", "local", "-> local (no CUDA)"),
        (False, None, "local", "-> local (no CUDA)"),
        (True, None, "local", "-> local (CUDA, but Transformer Engine does not import)"),
    ],
)
def test_auto_picks_transformer_engine_only_with_te_and_cuda(cuda, te, impl, line):
    cfg = _config("debug.yaml", "model.transformer_impl=auto")
    resolved, lines = _resolve(cfg, cuda=cuda, capability=H100 if cuda else None, te=te)
    assert resolved.model.transformer_impl == impl
    assert lines == [f"model.transformer_impl=auto {line}"]
    assert cfg.model.transformer_impl == "auto"  # the caller's config is left alone


@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_explicit_impls_are_kept_and_nothing_is_logged(impl):
    cfg = _config("debug.yaml", f"model.transformer_impl={impl}")
    resolved, lines = _resolve(cfg)
    assert resolved is cfg and lines == []


@pytest.mark.parametrize(
    "cuda, capability, te, fp8, reason",
    [
        (True, H100, "2.14.0", "hybrid", "compute capability 9.0"),
        (True, A100, "2.14.0", None, "compute capability 8.0 < 8.9"),
        (True, H100, None, None, "transformer_impl=local"),
        (False, None, "2.14.0", None, "transformer_impl=local"),
    ],
)
def test_fp8_on_gpu_turns_fp8_on_only_where_it_can_run(cuda, capability, te, fp8, reason):
    cfg = _config("mm1_7b.yaml")
    assert (cfg.model.transformer_impl, cfg.model.fp8_on_gpu) == ("auto", "hybrid")
    resolved, lines = _resolve(cfg, cuda=cuda, capability=capability, te=te)
    assert resolved.model.fp8 == fp8
    assert resolved.model.fp8_on_gpu is None  # the decision lives in model.fp8 now
    assert lines[-1] == f"model.fp8_on_gpu=hybrid -> model.fp8={fp8 or 'null'} ({reason})"
    validate_config(resolved)  # what the run saves is a valid config


def test_fp8_on_gpu_with_explicit_transformer_engine_on_an_older_gpu_runs_bf16():
    cfg = _config(
        "debug.yaml", "model.transformer_impl=transformer_engine", "model.fp8_on_gpu=e4m3"
    )
    resolved, _ = _resolve(cfg, capability=A100)
    assert resolved.model.transformer_impl == "transformer_engine"
    assert resolved.model.fp8 is None


@pytest.mark.parametrize("name", ["mm1_3b.yaml", "mm1_7b.yaml", "mm1_30b.yaml", "mm1_3b_moe.yaml"])
def test_recipes_save_concrete_settings_on_every_machine(name, tmp_path):
    """H100 with TE, A100 with TE, a laptop: the saved config.yaml, read back, holds no
    auto and no fp8_on_gpu, and loads and validates as it is (resume, mm1-eval, export)."""
    for cuda, capability, te in [
        (True, H100, "2.14.0"),
        (True, A100, "2.14.0"),
        (False, None, None),
    ]:
        resolved, _ = _resolve(_config(name), cuda=cuda, capability=capability, te=te)
        again = validate_config(load_config(save_config(resolved, tmp_path / "config.yaml")))
        assert again.model.transformer_impl in ("local", "transformer_engine")
        assert again.model.fp8_on_gpu is None
        assert again == resolved


def test_grouped_gemm_with_auto_is_checked_again_once_resolved():
    cfg = _config(
        "debug.yaml",
        "model.transformer_impl=auto",
        "model.llm.moe.num_experts=4",
        "model.llm.moe.grouped_gemm=true",
    )
    on_gpu, _ = _resolve(cfg)
    validate_config(on_gpu)
    on_cpu, _ = _resolve(cfg, cuda=False, capability=None, te=None)
    with pytest.raises(ValueError, match="grouped_gemm=true needs Transformer Engine"):
        validate_config(on_cpu)


def test_the_trainer_saves_and_checkpoints_the_resolved_impl(
    megatron_single_process, tmp_path, caplog
):
    from mm1_megatron.training.trainer import Trainer

    cfg = load_config(
        REPO / "configs/debug.yaml",
        [
            "model.transformer_impl=auto",
            "model.fp8_on_gpu=hybrid",
            "training.train_steps=1",
            f"logging.output_dir={tmp_path / 'run'}",
            "logging.tensorboard=false",
        ],
    )
    with caplog.at_level(logging.INFO):
        trainer = Trainer(cfg)
    logged = [r.getMessage() for r in caplog.records if "transformer_impl=auto" in r.getMessage()]
    assert logged == ["model.transformer_impl=auto -> local (no CUDA)"]
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.model.transformer_impl == "local"
    assert (saved.model.fp8, saved.model.fp8_on_gpu) == (None, None)
    assert trainer._training_state().config.model == saved.model  # what checkpoints save


# ---- fused cross-entropy ---------------------------------------------------------------


@pytest.mark.parametrize(
    "cuda, te_installed, expected",
    [(True, True, "native"), (True, False, "native"), (False, True, "native")],
)
def test_fused_cross_entropy_stays_native_even_with_transformer_engine(
    monkeypatch, cuda, te_installed, expected
):
    from mm1_megatron.models.transformer_configs import language_transformer_config

    real = runtime._installed
    monkeypatch.setattr(
        runtime,
        "_installed",
        lambda name: te_installed if name == "transformer_engine" else real(name),
    )
    cfg = _config("debug.yaml")
    choices = resolve_build_choices(cfg, cuda=cuda, bf16=cuda, resuming=False)
    assert choices.runtime.cross_entropy_fusion_impl == expected
    # RoPE fusion, chosen with the stand-in TE too, needs the real one to build a config.
    built = dataclasses.replace(choices.runtime, apply_rope_fusion=False)
    lm = language_transformer_config(cfg.model, cfg.parallel, built)
    assert lm.cross_entropy_fusion_impl == expected


# ---- readers of transformer_impl before a start ----------------------------------------


def test_estimates_treat_auto_as_transformer_engine_on_gpu_and_say_so():
    from mm1_megatron.scaling.estimate.activations import kernels_for
    from mm1_megatron.scaling.estimate.estimator import ASSUMPTIONS

    def kernels(impl, device):
        model = _config("mm1_3b.yaml", f"model.transformer_impl={impl}").model
        return kernels_for(model, device=device, bf16=device == "gpu", fused=device == "gpu")

    assert kernels("auto", "gpu") == kernels("transformer_engine", "gpu")
    assert kernels("auto", "gpu") != kernels("local", "gpu")
    assert kernels("auto", "cpu") == kernels("local", "cpu")
    assert any("transformer_impl=auto is estimated as transformer_engine" in a for a in ASSUMPTIONS)


def test_unresolved_auto_builds_local_layers_in_conversion_and_grouped_gemm():
    from mm1_megatron.conversion.megatron_io import placeholder_model_config
    from mm1_megatron.models.transformer_configs import uses_grouped_gemm

    model = _config("mm1_7b_moe.yaml").model
    assert model.transformer_impl == "auto"
    assert not uses_grouped_gemm(model)
    converted = placeholder_model_config(model, keep={"vision_encoder", "language_model"})
    assert (converted.transformer_impl, converted.fp8) == ("local", None)


def test_te_version_is_none_without_transformer_engine():
    if runtime._installed("transformer_engine"):
        pytest.skip("Transformer Engine is installed here")
    assert runtime.transformer_engine_version() is None


# ---- every rank decides the same --------------------------------------------------------
def test_ranks_that_resolve_different_layers_stop_on_every_rank(monkeypatch):
    """One node whose Transformer Engine does not import would build local layers while
    the others build TE ones; the trainer compares what every rank decided."""
    from mm1_megatron.training import trainer as trainer_module

    def gathered(value):
        return [value, ("local", None)]  # this rank, and another that decided otherwise

    monkeypatch.setattr(trainer_module, "all_gather_objects", gathered)
    fake = trainer_module.Trainer.__new__(trainer_module.Trainer)
    fake.ctx = type("Ctx", (), {"is_main": True})()
    cfg = _config("debug.yaml", "model.transformer_impl=transformer_engine")
    with pytest.raises(ValueError, match="resolved model.transformer_impl/model.fp8 differently"):
        fake._resolve_machine_settings(cfg, cuda=False, capability=None)
    monkeypatch.setattr(trainer_module, "all_gather_objects", lambda value: [value, value])
    assert fake._resolve_machine_settings(cfg, cuda=False, capability=None) is not None


def test_a_load_problem_on_another_rank_stops_this_one(monkeypatch, tmp_path):
    """A bad tensor on one pipeline stage or expert shard raises on every rank, not only
    where it was found (the others would wait in the next collective)."""
    import torch

    from mm1_megatron.checkpoint import loading

    module = torch.nn.Linear(2, 2)
    problem = f"{tmp_path} lacks 1 tensors of the model, e.g. layers.7.weight"
    monkeypatch.setattr(loading, "all_gather_objects", lambda value: [value, problem])
    with pytest.raises(ValueError, match="layers.7.weight"):
        loading.load_module_state(module, module.state_dict(), tmp_path)
    monkeypatch.setattr(loading, "all_gather_objects", lambda value: [value, None])
    loading.load_module_state(module, module.state_dict(), tmp_path)
