"""The compatibility package: fail-loud patching, spec helpers, gloo stand-ins, and the
rule that nothing outside ``mm1_megatron/compat`` assigns to torch / megatron-core."""

from __future__ import annotations

import ast
import functools
import logging
import types
from pathlib import Path

import pytest
import torch

from mm1_megatron.compat import patching
from mm1_megatron.compat.patching import CompatibilityError, replace_attribute

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_registry(monkeypatch):
    """Patch bookkeeping of this test only; the process's real patches are untouched."""
    monkeypatch.setattr(patching, "_applied", {})
    monkeypatch.setattr(patching, "_originals", {})
    monkeypatch.setattr(patching, "_logged", {"done": False})


def test_missing_target_fails_naming_attribute_and_versions(clean_registry):
    stand_in = types.ModuleType("fake_megatron.core.moe_utils")
    with pytest.raises(CompatibilityError) as excinfo:
        replace_attribute(
            stand_in,
            "renamed_in_a_new_release",
            lambda: None,
            reason="a test",
            written_for="megatron-core 0.16.1-0.19.2",
        )
    message = str(excinfo.value)
    assert "fake_megatron.core.moe_utils.renamed_in_a_new_release" in message
    assert "megatron-core 0.16.1-0.19.2" in message
    assert not hasattr(stand_in, "renamed_in_a_new_release")  # nothing was created


def test_missing_method_of_a_class_names_the_class(clean_registry):
    class Optimizer:
        def step(self):
            return "original"

    with pytest.raises(CompatibilityError, match=r"Optimizer\._private_name.*torch 9"):
        replace_attribute(Optimizer, "_private_name", None, reason="r", written_for="torch 9")


def test_replacement_returns_original_and_is_recorded(clean_registry):
    stand_in = types.ModuleType("stand_in")
    stand_in.target = lambda: "original"
    original = replace_attribute(
        stand_in, "target", lambda: "patched", reason="why", written_for="v1", scope="cpu"
    )
    assert original() == "original" and stand_in.target() == "patched"
    (patch,) = patching.active_patches()
    assert (patch.target, patch.reason, patch.written_for, patch.scope) == (
        "stand_in.target",
        "why",
        "v1",
        "cpu",
    )
    with pytest.raises(CompatibilityError, match="already patched"):
        replace_attribute(stand_in, "target", lambda: None, reason="again", written_for="v1")


def test_define_missing_only_where_missing(clean_registry):
    stand_in = types.ModuleType("stand_in")
    assert patching.define_missing(stand_in, "gemm", None, reason="r", written_for="v")
    assert stand_in.gemm is None
    stand_in.present = "kept"
    assert not patching.define_missing(stand_in, "present", None, reason="r", written_for="v")
    assert stand_in.present == "kept"


def test_active_patches_are_logged_once(clean_registry, caplog):
    stand_in = types.ModuleType("stand_in")
    stand_in.target = 1
    replace_attribute(stand_in, "target", 2, reason="why", written_for="v1")
    with caplog.at_level(logging.INFO, logger="mm1_megatron.compat.patching"):
        patching.log_active_patches()
        patching.log_active_patches()
    lines = [r.getMessage() for r in caplog.records if "patches active" in r.getMessage()]
    assert len(lines) == 1 and "stand_in.target" in lines[0]


def test_the_real_patches_are_registered(megatron_single_process):
    names = {p.target for p in patching.active_patches()}
    if not torch.cuda.is_available():
        assert "torch.cuda.current_device" in names
        assert "megatron.core.tensor_parallel.random._get_cuda_rng_state" in names
        assert all(p.scope in ("cpu", "all") for p in patching.active_patches())


# ---- spec helpers ---------------------------------------------------------------------


def test_spec_helpers_treat_module_spec_and_partial_alike():
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from mm1_megatron.compat import specs

    class Experts:
        pass

    class Replacement:
        pass

    as_spec = ModuleSpec(
        module="MoE", submodules=MoESubmodules(experts=ModuleSpec(module=Experts, submodules="mlp"))
    )
    as_partial = functools.partial(
        "MoE".__class__,
        submodules=MoESubmodules(experts=functools.partial(Experts, submodules="mlp")),
    )
    for builder in (as_spec, as_partial):
        rebuilt = specs.map_experts(builder, lambda e: specs.with_module(e, Replacement))
        experts = specs.spec_submodules(rebuilt).experts
        assert specs.spec_module(experts) is Replacement
        assert specs.spec_submodules(experts) == "mlp"
        # the original is untouched (megatron-core 0.19 shares specs between layers)
        assert specs.spec_module(specs.spec_submodules(builder).experts) is Experts


def test_dense_mlp_has_no_experts_to_map():
    from mm1_megatron.compat import specs

    dense = functools.partial(dict, submodules=types.SimpleNamespace(linear_fc1=1))
    assert specs.map_experts(dense, lambda e: pytest.fail("no experts")) is dense


# ---- gloo stand-ins -------------------------------------------------------------------


def test_uneven_all_gather_pads_and_trims():
    from mm1_megatron.compat import gloo

    def even_all_gather(parts, tensor, group=None, async_op=False):
        for i, part in enumerate(parts):  # two "ranks": rank 1 holds tensor + 10
            part.copy_(tensor + 10 * i)

    gather = gloo._uneven_all_gather(even_all_gather)
    outputs = [torch.empty(2, 3), torch.empty(1, 3)]
    gather(outputs, torch.ones(2, 3))
    assert torch.equal(outputs[0], torch.ones(2, 3))
    assert torch.equal(outputs[1], torch.full((1, 3), 11.0))
    with pytest.raises(NotImplementedError, match="async_op"):
        gather([torch.empty(2, 3), torch.empty(1, 3)], torch.ones(2, 3), async_op=True)


def test_even_all_gather_passes_async_op_through():
    from mm1_megatron.compat import gloo

    seen = {}

    def even_all_gather(parts, tensor, group=None, async_op=False):
        seen["async_op"] = async_op
        return "handle"

    gather = gloo._uneven_all_gather(even_all_gather)
    assert gather([torch.empty(2), torch.empty(2)], torch.ones(2), async_op=True) == "handle"
    assert seen["async_op"] is True


def test_uneven_reduce_scatter_refuses_async():
    from mm1_megatron.compat import gloo

    reduce_scatter = gloo._uneven_reduce_scatter(lambda *a, **k: None)
    with pytest.raises(NotImplementedError, match="async_op"):
        reduce_scatter(torch.empty(1), [torch.ones(1), torch.ones(2)], async_op=True)


def test_all_to_all_converts_split_tensors_to_lists():
    from mm1_megatron.compat import gloo

    seen = {}

    def original(output, input, output_split_sizes, input_split_sizes, group=None, async_op=False):
        seen.update(out=output_split_sizes, inp=input_split_sizes, async_op=async_op)

    gloo._all_to_all_with_list_splits(original)(
        None, None, torch.tensor([1, 2]), [3, 4], async_op=True
    )
    assert seen == {"out": [1, 2], "inp": [3, 4], "async_op": True}


# ---- no patching outside the compatibility package ------------------------------------


def _imported_names(tree: ast.AST) -> set:
    """Names bound to torch / megatron-core modules, classes or functions by imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("torch", "megatron"):
                    names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in ("torch", "megatron"):
                names.update(alias.asname or alias.name for alias in node.names)
    return names


def _root_name(node: ast.AST):
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def foreign_assignments(source: str) -> list:
    """``(line, text)`` of assignments to attributes of imported torch/megatron objects."""
    tree = ast.parse(source)
    foreign = _imported_names(tree)
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("setattr", "delattr")
            and node.args
        ):
            if _root_name(node.args[0]) in foreign:
                found.append((node.lineno, ast.unparse(node)))
            continue
        for target in targets:
            elements = target.elts if isinstance(target, ast.Tuple) else [target]
            for element in elements:
                if isinstance(element, ast.Attribute) and _root_name(element) in foreign:
                    found.append((node.lineno, ast.unparse(element)))
    return found


def test_the_checker_finds_monkeypatches():
    source = (
        "import torch\nimport torch.distributed as dist\n"
        "from megatron.core.tensor_parallel import random as mcore_random\n"
        "from megatron.core.optimizer import DistributedOptimizer\n"
        "torch.cuda.current_device = lambda: 0\n"
        "dist.all_gather, x = None, 1\n"
        "mcore_random._get_cuda_rng_state = None\n"
        "setattr(DistributedOptimizer, 'step', None)\n"
        "model = object()\nmodel.flag = True\n"
    )
    lines = [line for line, _ in foreign_assignments(source)]
    assert lines == [5, 6, 7, 8]


def test_no_torch_or_megatron_attribute_is_assigned_outside_compat():
    compat = REPO_ROOT / "mm1_megatron" / "compat"
    files = [
        path
        for folder in ("mm1_megatron", "tools", "examples")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        if compat not in path.parents
    ]
    assert len(files) > 50
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {text}"
        for path in files
        for line, text in foreign_assignments(path.read_text())
    ]
    assert offenders == [], "patch torch/megatron-core only through mm1_megatron/compat"


# ---- versions -------------------------------------------------------------------------


def test_setup_py_admits_exactly_the_tested_range():
    from mm1_megatron.compat import versions

    setup_py = (REPO_ROOT / "setup.py").read_text()
    assert f'"{versions.MCORE_REQUIREMENT}"' in setup_py
    assert versions.MCORE_VERSION in versions.MCORE_SPECIFIER
    for tested in ("0.16.1", "0.19.2"):
        assert tested in versions.MCORE_SPECIFIER
    for untested in ("0.16.0", "0.17.1", "0.18.2", "0.19.0", "0.20.0"):
        assert untested not in versions.MCORE_SPECIFIER


@pytest.mark.slow
def test_gpu_processes_get_no_cpu_only_patches():
    """With CUDA reported available, install_patches leaves torch.cuda and the
    collectives alone (fresh interpreter: this process already has the CPU patches)."""
    import subprocess
    import sys

    script = (
        "from mm1_megatron.compat.install import install_patches\n"
        "import torch\n"
        "before = torch.cuda.current_device\n"
        "patches = install_patches(cuda_available=True)\n"
        "assert torch.cuda.current_device is before\n"
        "print(sorted((p.scope, p.target) for p in patches))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'cpu'" not in result.stdout


def test_a_deeper_model_gets_a_fresh_moe_tracker(megatron_single_process):
    """Megatron-Core keeps a tracker entry sized for the first model's layers; a second,
    deeper model in the same process indexed past it until the trainer forgot it."""
    from mm1_megatron.compat.moe import collect_moe_aux_losses, forget_moe_aux_losses

    cpu = torch.device("cpu")
    collect_moe_aux_losses(["load_balancing_loss"], num_layers=2, device=cpu)
    stale = collect_moe_aux_losses(["load_balancing_loss"], num_layers=4, device=cpu)
    assert stale["load_balancing_loss"].shape == (2,)  # what the router wrote into
    forget_moe_aux_losses()
    fresh = collect_moe_aux_losses(["load_balancing_loss"], num_layers=4, device=cpu)
    assert fresh["load_balancing_loss"].shape == (4,)
    forget_moe_aux_losses()
