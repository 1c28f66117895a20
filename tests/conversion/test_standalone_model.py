"""The exported MM1 model needs only torch and transformers.

- an MM1 export loads with ``trust_remote_code=True`` in a process where neither
  ``mm1_megatron`` nor ``megatron`` can be imported, and gives exactly the logits of the
  load through our package (which needs no remote code);
- the files that travel with an export import nothing else (checked on their source);
- a model loaded through our package and saved again keeps its code next to it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import torch

from tests.launch import clean_env

HF_MODEL = Path(__file__).resolve().parents[2] / "mm1_megatron" / "hf_model"
ALLOWED_PACKAGES = {"torch", "transformers"}

# Runs with ``python -I`` (no PYTHONPATH, no current directory on sys.path). Our package
# is also installed in the environment (editable), so imports of it and of megatron are
# refused outright by a finder placed first on sys.meta_path.
STANDALONE_LOAD = """
import importlib, json, sys
BLOCKED = ("mm1_megatron", "megatron")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in this process", name=name)
sys.meta_path.insert(0, Block())
for name in BLOCKED:
    try:
        importlib.import_module(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} could be imported")
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText
folder, inputs, output, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
batch = load_file(inputs)
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
save_file({"logits": logits.contiguous()}, output)
print(json.dumps({"class_module": type(model).__module__,
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_export_loads_with_remote_code_where_our_package_cannot_be_imported(
    trained_exports, worker_outputs, tmp_path
):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register as register

    folder = trained_exports["dense_tp2"]
    reference = load_file(str(worker_outputs / "dense_tp2.safetensors"))
    inputs = tmp_path / "inputs.safetensors"
    save_file({"input_ids": reference["tokens"], "pixel_values": reference["images"]}, str(inputs))
    output, modules = tmp_path / "logits.safetensors", tmp_path / "hf_modules"
    # The remote-code loader copies the model's code into HF_MODULES_CACHE: a temporary one.
    env = clean_env(HF_MODULES_CACHE=str(modules), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            STANDALONE_LOAD,
            str(folder),
            str(inputs),
            str(output),
            str(torch.get_num_threads()),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [], report
    assert report["class_module"].startswith("transformers_modules."), report
    assert list(modules.rglob("modeling_mm1.py")), "the code was not loaded from the cache"

    # Through our package: registered, so no trust_remote_code, no prompt, our own class.
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model) is register.MM1ForConditionalGeneration
    with torch.no_grad():
        ours = model(input_ids=reference["tokens"], pixel_values=reference["images"]).logits
    theirs = load_file(str(output))["logits"]
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module


def test_the_exported_code_imports_only_stdlib_torch_transformers_and_itself():
    from mm1_megatron.hf_model import CODE_FILES, PROCESSOR_CODE_FILES

    found = []
    for name in CODE_FILES + PROCESSOR_CODE_FILES:
        shipped_with = CODE_FILES if name in CODE_FILES else PROCESSOR_CODE_FILES
        for line, level, module in _imports(HF_MODEL / name):
            if level == 0:
                ok = module.split(".")[0] in ALLOWED_PACKAGES | set(sys.stdlib_module_names)
            else:  # transformers copies ``from .sibling import x`` siblings, nothing else
                ok = level == 1 and module is not None and f"{module}.py" in shipped_with
            if not ok:
                found.append(f"{name}:{line} imports {'.' * level}{module}")
    assert found == []


def test_the_exported_files_are_what_the_remote_code_loader_needs():
    """``CODE_FILES`` is exactly the model file plus what it imports (as transformers sees
    it), and ``AUTO_MAP`` names the classes that save_pretrained would name."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from mm1_megatron.hf_model import AUTO_MAP, CODE_FILES
    from mm1_megatron.hf_model.register import MM1ForConditionalGeneration, MM1HFConfig

    modeling = HF_MODEL / "modeling_mm1.py"
    needed = {modeling.name} | {Path(f).name for f in get_relative_import_files(modeling)}
    assert needed == set(CODE_FILES)
    assert AUTO_MAP == {
        cls._auto_class: f"{cls.__module__.split('.')[-1]}.{cls.__name__}"
        for cls in (MM1HFConfig, MM1ForConditionalGeneration)
    }


def test_export_carries_its_code_and_auto_map(trained_exports):
    from mm1_megatron.hf_model import AUTO_MAP, CODE_FILES

    folder = trained_exports["dense_tp2"]
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name in CODE_FILES:
        assert (folder / name).read_bytes() == (HF_MODEL / name).read_bytes(), name
    assert "trust_remote_code=True" in (folder / "README.md").read_text()


def test_a_model_saved_again_keeps_its_code(trained_exports, tmp_path):
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"
    from mm1_megatron.hf_model import AUTO_MAP, CODE_FILES

    model = AutoModelForImageTextToText.from_pretrained(trained_exports["dense_tp2"])
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name in CODE_FILES:
        assert (tmp_path / "saved" / name).read_bytes() == (HF_MODEL / name).read_bytes(), name
