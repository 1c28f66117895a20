"""Megatron-Core's fused functions compile on first call (``compat/deferred_compile.py``):
what runs is ``torch.compile(function)``, built once, and only when called."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from mm1_megatron.compat import deferred_compile as deferred
from mm1_megatron.compat import patching
from mm1_megatron.compat.patching import CompatibilityError


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(patching, "_applied", {})
    monkeypatch.setattr(patching, "_originals", {})


@pytest.fixture
def counted_compile(monkeypatch):
    """torch.compile replaced by a recorder that returns a doubling wrapper."""
    calls = []

    def fake_compile(function):
        calls.append(function)
        return lambda *args: 2 * function(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    return calls


def test_compiles_once_on_the_first_call_with_the_original_function(counted_compile):
    def add(x, y):
        return x + y

    wrapped = deferred.deferred_compile(add)
    assert counted_compile == [] and wrapped.__name__ == "add"
    assert wrapped(1, 2) == 6 and wrapped(2, 3) == 10
    assert counted_compile == [add]


def test_this_process_got_the_deferred_fuser():
    # pytest imports mm1_megatron (conftest fixtures) before anything imports megatron-core.
    import megatron.core.jit
    from megatron.core.fusions import fused_bias_geglu

    assert megatron.core.jit.jit_fuser is deferred.deferred_compile
    assert getattr(fused_bias_geglu.geglu, "__wrapped_by_mm1__", None) == "deferred_compile"
    assert "megatron.core.jit.jit_fuser" in {p.target for p in patching.active_patches()}


def test_a_release_without_jit_fuser_fails_loudly(clean_registry):
    module = types.ModuleType("megatron.core.jit")
    module.torch = torch
    with pytest.raises(CompatibilityError, match="jit_fuser"):
        deferred._replace_jit_fuser(module)


def test_another_fuser_is_left_alone(clean_registry):
    module = types.ModuleType("megatron.core.jit")
    module.torch = torch
    module.jit_fuser = torch.jit.script
    deferred._replace_jit_fuser(module)
    assert module.jit_fuser is torch.jit.script and patching.active_patches() == []


def test_nothing_is_installed_once_megatron_is_imported(monkeypatch):
    monkeypatch.setitem(sys.modules, deferred.JIT_MODULE, types.ModuleType("jit"))
    before = list(sys.meta_path)
    assert deferred.defer_megatron_compile() is False
    assert sys.meta_path == before


@pytest.mark.slow
def test_importing_the_trainer_imports_no_inductor():
    """In a fresh interpreter: neither torch._dynamo nor torch._inductor (both megatron-core
    lines; 0.19's MoE router decorates a method with torch.compile itself)."""
    from tests.launch import run

    probe = (
        "import sys, mm1_megatron.training.trainer; "
        "print(int('torch._inductor' in sys.modules or 'torch._dynamo' in sys.modules))"
    )
    result = run([sys.executable, "-W", "ignore", "-c", probe])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0"


def test_options_are_passed_through(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda f, **o: seen.append(o) or f)
    wrapped = deferred.deferred_compile(dynamic=True)(lambda x: x + 1)
    assert seen == [] and wrapped(1) == 2 and seen == [{"dynamic": True}]


def test_the_router_import_leaves_torch_compile_as_it_was():
    from megatron.core.transformer.moe import router  # noqa: F401

    assert torch.compile is not deferred.deferred_compile


def test_the_router_patch_is_reported_only_where_the_router_compiles():
    from megatron.core.transformer.moe import router

    compiles_itself = "torch.compile" in open(router.__file__).read().split("def ", 1)[1]
    reported = any("moe.router" in p.target for p in patching.active_patches())
    assert reported == compiles_itself
