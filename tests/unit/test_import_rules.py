"""The library's import rules, checked on every import statement (also those inside
functions, and relative ones): data and models stay independent of training; the batch
contract sits below both; the transformers model (hf_model) depends on nothing else of
ours; the three scaling tools stay apart; nothing imports the tests."""

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


# `mm1 <verb>` names each verb's module as a string and imports it only to run it, so
# `mm1 --help` loads none of them (tests/unit/test_cli_dispatch.py).
FORBIDDEN["cli"] = (
    "batch", "checkpoint", "compat", "config", "conversion", "data", "evaluation",
    "hf_model", "inference", "launch", "models", "parallel", "scaling", "training",
)  # fmt: skip

# The scaling tools sit on top: no other package imports them.
for _package in ("batch", "checkpoint", "compat", "config", "conversion", "data",
                 "evaluation", "inference", "models", "parallel", "training", "utils"):  # fmt: skip
    FORBIDDEN[_package] = tuple(FORBIDDEN.get(_package, ())) + ("scaling", "launch")


def imported_modules(path: Path, root: Path = PACKAGE):
    """``(line, dotted name)`` of every import in ``path`` (a file under ``root``). ``from
    a import b`` gives ``a.b`` (``b`` may be a sub-package: ``from mm1_megatron.scaling
    import sweep``); relative imports are resolved against the file's package."""
    package = path.parent.relative_to(root.parent).parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = [node.module] if node.module else []
            if node.level:
                base = [*package[: len(package) - node.level + 1], *base]
            for alias in node.names:
                yield node.lineno, ".".join(base + ([] if alias.name == "*" else [alias.name]))


def violations(package: str, forbidden, root: Path = PACKAGE) -> list:
    """Imports under ``package`` (``data``, or a sub-package: ``scaling.sweep``) of
    ``mm1_megatron.<f>`` or anything inside it, for each ``f`` of ``forbidden`` (dotted
    the same way)."""
    found = []
    forbidden = [tuple(f.split(".")) for f in forbidden]
    for path in sorted(root.joinpath(*package.split(".")).rglob("*.py")):
        for line, module in imported_modules(path, root):
            parts = tuple(module.split("."))
            if parts[0] == "mm1_megatron" and any(parts[1 : 1 + len(f)] == f for f in forbidden):
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
        "mm1_megatron/data/bad.py:2 imports mm1_megatron.models.mm1_model.X"
    ]


# Inside data/: tokenizers <- shards <- pipeline <- synthetic <- build (an arrow: "is
# imported by"). The synthetic world uses the pipeline's packing; the pipeline never needs
# the synthetic world, so the world could move out without touching the pipeline.
DATA_LAYERS = {
    "data.tokenizers": ("data.shards", "data.pipeline", "data.synthetic", "data.build"),
    "data.shards": ("data.pipeline", "data.synthetic", "data.build"),
    "data.pipeline": ("data.synthetic", "data.build"),
    "data.synthetic": ("data.build",),
}

# The scaling tools: mm1-sweep prunes runs with mm1-estimate's memory estimate; mm1-report
# reads only what runs wrote (sweep.json too), so it needs neither of the others.
SCALING_TOOLS = {
    "scaling.estimate": ("scaling.sweep", "scaling.report"),
    "scaling.sweep": ("scaling.report",),
    "scaling.report": ("scaling.estimate", "scaling.sweep"),
}

SUBPACKAGE_RULES = {**DATA_LAYERS, **SCALING_TOOLS}


@pytest.mark.parametrize("package", sorted(SUBPACKAGE_RULES))
def test_subpackage_imports_only_what_its_layer_allows(package):
    assert (PACKAGE.joinpath(*package.split("."))).is_dir()
    assert violations(package, SUBPACKAGE_RULES[package]) == []


def test_the_checker_sees_a_subpackage_violation(tmp_path):
    root = tmp_path / "mm1_megatron"
    report = root / "scaling" / "report"
    report.mkdir(parents=True)
    (report / "ok.py").write_text(
        "from mm1_megatron.scaling.report.runs import RunRecord\n"
        "from mm1_megatron.scaling import report\n"
        "from . import fit\n"
        "import mm1_megatron.scaling.sweeping\n"  # only starts like a forbidden name
    )
    (report / "bad.py").write_text(
        "from mm1_megatron.scaling.estimate.memory import estimate_memory\n"
        "def f():\n"
        "    from mm1_megatron.scaling import sweep\n"
        "    from ..sweep.spec import load_spec\n"
        "    import mm1_megatron.scaling.estimate\n"
    )
    assert violations("scaling.report", SCALING_TOOLS["scaling.report"], root=root) == [
        "mm1_megatron/scaling/report/bad.py:1 imports "
        "mm1_megatron.scaling.estimate.memory.estimate_memory",
        "mm1_megatron/scaling/report/bad.py:3 imports mm1_megatron.scaling.sweep",
        "mm1_megatron/scaling/report/bad.py:4 imports mm1_megatron.scaling.sweep.spec.load_spec",
        "mm1_megatron/scaling/report/bad.py:5 imports mm1_megatron.scaling.estimate",
    ]
