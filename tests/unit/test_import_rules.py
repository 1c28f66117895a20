"""The library's import rules, checked on every import statement (also those inside
functions): data and models stay independent of training; the batch contract sits
below both; the transformers model (hf_model) depends on nothing else of ours; nothing
imports the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mm1_megatron"

FORBIDDEN = {
    "data": ("models", "training", "checkpoint", "conversion"),
    "models": ("data", "training", "checkpoint", "conversion"),
    "batch": ("data", "models", "training", "checkpoint", "conversion"),
    "compat": ("data", "models", "training", "checkpoint", "conversion", "parallel"),
    # Generation runs any model it is given: no data pipeline, no trainer, no evaluation.
    "inference": ("data", "training", "checkpoint", "conversion", "evaluation"),
    # Evaluation reads checkpoints and generates; it never reaches into the trainer.
    "evaluation": ("training", "conversion"),
    # Rendering launch files needs no torch (tests/cluster/test_launch_render.py).
    "launch": ("data", "models", "training", "checkpoint", "conversion", "scaling"),
    # Its model files also ship alone in exports (tests/conversion/test_standalone_model.py).
    "hf_model": (
        "batch",
        "checkpoint",
        "compat",
        "config",
        "conversion",
        "data",
        "models",
        "parallel",
        "training",
        "utils",
    ),
}


# The scaling tools sit on top: no other package imports them.
for _package in ("batch", "checkpoint", "compat", "config", "conversion", "data",
                 "evaluation", "inference", "models", "parallel", "training", "utils"):  # fmt: skip
    FORBIDDEN[_package] = tuple(FORBIDDEN.get(_package, ())) + ("scaling", "launch")


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def violations(package: str, forbidden, root: Path = PACKAGE) -> list:
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if parts[0] == "mm1_megatron" and len(parts) > 1 and parts[1] in forbidden:
                found.append(f"{path.relative_to(root.parent)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_upwards(package):
    assert violations(package, FORBIDDEN[package]) == []


def test_the_library_never_imports_tests():
    found = [
        f"{path}:{line}"
        for path in PACKAGE.rglob("*.py")
        for line, module in imported_modules(path)
        if module.split(".")[0] == "tests"
    ]
    assert found == []


def test_the_checker_sees_a_violation(tmp_path):
    fake = tmp_path / "mm1_megatron" / "data"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("def f():\n    from mm1_megatron.models.mm1_model import X\n")
    assert violations("data", FORBIDDEN["data"], root=tmp_path / "mm1_megatron") == [
        "mm1_megatron/data/bad.py:2 imports mm1_megatron.models.mm1_model"
    ]


# Inside data/: tokenizers <- shards <- pipeline <- synthetic <- build (an arrow: "is
# imported by"). The synthetic world uses the pipeline's packing; the pipeline never needs
# the synthetic world, so the world could move out without touching the pipeline.
DATA_LAYERS = {
    "tokenizers": ("shards", "pipeline", "synthetic", "build"),
    "shards": ("pipeline", "synthetic", "build"),
    "pipeline": ("synthetic", "build"),
    "synthetic": ("build",),
}


@pytest.mark.parametrize("layer", sorted(DATA_LAYERS))
def test_data_subpackages_import_downwards_only(layer):
    found = []
    for path in sorted((PACKAGE / "data" / layer).rglob("*.py")):
        for line, module in imported_modules(path):
            parts = module.split(".")
            if (
                parts[:2] == ["mm1_megatron", "data"]
                and len(parts) > 2
                and parts[2] in DATA_LAYERS[layer]
            ):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert found == []
