"""``tools/gpu_check.py`` runs (here without a GPU) and writes its figures; its parts that
a bare GPU machine depends on (the wheel folder, the offline install, skipping what is
absent, the resume comparison) behave without a GPU and without the network."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# Starts processes (scripts, launchers, tools): the slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _install_requires() -> list:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            return [ast.literal_eval(item) for item in node.value.elts]
    raise AssertionError("setup.py has no install_requires")


def _name(requirement: str) -> str:
    return re.split(r"[<>=!;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_wheel_list_covers_the_runtime_needs_of_a_bare_cuda_torch_machine():
    wheels = _tool("gpu_wheels")
    names = {_name(item) for item in wheels.RUNTIME_REQUIREMENTS}
    needed = {_name(item) for item in _install_requires()} - {"torch", "tensorboard"}
    assert needed <= names, needed - names
    assert "megatron-core==0.19.2" in wheels.RUNTIME_REQUIREMENTS
    # the editable install without build isolation, and te_export's transformers
    assert {"setuptools", "wheel", "transformers", "tokenizers", "safetensors"} <= names
    assert not {"torch", "tensorboard", "triton"} & names  # the machine's own / not needed


def test_wheel_download_command_takes_only_the_listed_binary_wheels(tmp_path):
    wheels = _tool("gpu_wheels")
    command = wheels.download_command(tmp_path / "w")
    assert command[1:4] == ["-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command
    pairs = list(zip(command, command[1:]))
    assert ("--python-version", "3.12") in pairs and ("--implementation", "cp") in pairs
    platforms = {b for a, b in pairs if a == "--platform"}
    # megatron-core 0.19.2 has manylinux_2_28/2_24 wheels only; the others older tags
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64", "any"} <= platforms
    assert ("--dest", str(tmp_path / "w")) in pairs
    assert command[-len(wheels.RUNTIME_REQUIREMENTS) :] == wheels.RUNTIME_REQUIREMENTS


def _fake_wheels(folder: Path, sizes_mib) -> Path:
    folder.mkdir()
    for index, mib in enumerate(sizes_mib):
        with open(folder / f"pkg{index}-1.0-py3-none-any.whl", "wb") as handle:
            handle.truncate(int(mib * 2**20))  # sparse: no disk used
    (folder / "notes.txt").write_text("not a wheel, not counted")
    return folder


def test_wheel_folder_size_guard(tmp_path, capsys):
    wheels = _tool("gpu_wheels")
    small = _fake_wheels(tmp_path / "small", [30, 20.5, 0.25])
    assert wheels.main(["--check-only", "--output", str(small)]) == 0
    out = capsys.readouterr().out
    assert "30.00 MiB  pkg0-1.0-py3-none-any.whl" in out
    assert "50.75 MiB  total of 3 wheels" in out and "FAIL" not in out
    big = _fake_wheels(tmp_path / "big", [40, 20])  # exactly 60 MiB: refused
    assert wheels.check_size(big) == 1
    assert "FAIL" in capsys.readouterr().out


def test_offline_install_uses_only_the_folder_and_keeps_the_machines_torch(tmp_path, monkeypatch):
    check = _tool("gpu_check")
    commands = []
    monkeypatch.setattr(
        check.subprocess,
        "run",
        lambda command, **kw: commands.append(command) or SimpleNamespace(returncode=0),
    )
    check.install_from_wheels(tmp_path, ["megatron-core==0.19.2", "numpy"])
    assert len(commands) == 2
    for command in commands:
        assert command[:4] == [sys.executable, "-m", "pip", "install"]
        assert "--no-index" in command and "--no-deps" in command
        assert command[command.index("--find-links") + 1] == str(tmp_path)
    assert commands[0][-2:] == ["megatron-core==0.19.2", "numpy"]
    assert "--no-build-isolation" in commands[1] and commands[1][-2:] == ["-e", str(REPO)]
    with pytest.raises(SystemExit, match="not a folder"):
        check.install_from_wheels(tmp_path / "missing", [])


def test_no_c_compiler_turns_the_fused_kernels_off(monkeypatch):
    check = _tool("gpu_check")
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", "")
    assert check.c_compiler() is None
    env = check.Environment(cuda=True, te="x", dali="x", apex="x", compiler=None)
    assert env.common_overrides() == ["training.fused_kernels=false"]
    assert check.Environment(True, None, None, None, "/usr/bin/gcc").common_overrides() == []
    assert check.Environment(False, "x", "x", "x", None).common_overrides() == []


def test_resumed_losses_first_step_exact_later_within_tolerance():
    check = _tool("gpu_check")
    reference = [{"step": s, "loss": v} for s, v in [(1, 5.0), (2, 4.0), (3, 3.0), (4, 2.0)]]
    ok = check.compare_resumed(
        reference, [{"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.0001}], 1e-3
    )
    assert ok["first_resumed_step_exact"] and ok["later_max_relative"] == pytest.approx(5e-5)
    with pytest.raises(RuntimeError, match="first resumed step 3"):
        check.compare_resumed(reference, [{"step": 3, "loss": 3.0000001}], 1e-3)
    with pytest.raises(RuntimeError, match="allowed 0.001"):
        check.compare_resumed(
            reference, [{"step": 3, "loss": 3.0}, {"step": 4, "loss": 2.01}], 1e-3
        )


def test_absent_accelerators_skip_their_steps_without_failing(tmp_path):
    check = _tool("gpu_check")
    env = check.Environment(
        cuda=True, te="not installed", dali="not installed", apex="x", compiler="cc"
    )
    ctx = check.Context(args=SimpleNamespace(steps=2), env=env, runs=None, work=tmp_path)
    steps = [s for s in check.all_steps() if s.name == "dali_vs_pil" or s.name.startswith("te_")]
    assert len(steps) == 7
    results, failed = check.run_steps(steps, ctx)
    assert failed == 0
    assert {r["status"] for r in results.values()} == {"skipped"}
    assert "DALI absent" in results["dali_vs_pil"]["reason"]
    assert "Transformer Engine absent" in results["te_fp8"]["reason"]


def test_every_step_has_an_estimate_and_all_fit_in_8_minutes():
    steps = _tool("gpu_check").all_steps()
    assert all(step.estimate_s > 0 for step in steps)
    assert sum(step.estimate_s for step in steps) < 8 * 60


def _gpu_check(tmp_path, *args, timeout=600):
    output = tmp_path / "figures.json"
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--allow-cpu", "--output", str(output), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result.stderr


def test_gpu_check_runs_its_cpu_capable_step(tmp_path):
    pytest.importorskip("nvidia.dali")
    figures, _ = _gpu_check(tmp_path, "--only", "dali_vs_pil", timeout=300)
    for mode in ("squash", "crop", "pad"):
        assert figures["dali_vs_pil"][mode]["max_8bit_steps"] <= 3
    assert "startup" not in figures


def test_te_steps_plumbing_runs_on_local_layers_without_a_gpu(tmp_path, caplog):
    """The CPU stand-in of te_attention and te_export: a 4-step run saved at steps 2 and
    4, the logits helper (two model builds, and the export loaded with transformers) and
    mm1-convert export, all on local layers. The check's ``main`` runs in this process:
    its steps start their commands in children either way, and a child of its own would
    only add the interpreter's and torch's start-up."""
    pytest.importorskip("transformers")
    caplog.set_level(logging.INFO)
    output = tmp_path / "figures.json"
    argv = ["--allow-cpu", "--output", str(output), "--only", "te_attention,te_export"]
    code = _tool("gpu_check").main(argv)
    log = caplog.text
    assert code == 0, log[-3000:]
    figures = json.loads(output.read_text())
    assert figures["te_attention"]["status"] == "ok", figures
    assert figures["te_attention"]["transformer_engine"] is False
    assert figures["te_attention"]["logits_relative_max"] == 0.0  # local against local
    assert figures["te_export"]["status"] == "ok", figures
    assert figures["te_export"]["te_vs_hf_relative_max"] <= 1e-4  # fp32 on both sides
    assert "estimated" in log and "run local layers in its place" in log


def test_gpu_check_refuses_to_pretend_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = subprocess.run(
        [sys.executable, "tools/gpu_check.py", "--output", str(tmp_path / "x.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "no GPU visible" in result.stderr
