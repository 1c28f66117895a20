"""Export of a LoRA run's checkpoint (adapters only) merged into its base: the exported
``transformers`` model computes what our adapted model computes (adapters unmerged), the
base is found by its record or ``--base``, and a base that is not the one trained on is
refused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conversion.conftest import TOLERANCE, WITHOUT_OUR_PACKAGE, export_to

ALL_PARTS = "model.lora.parts=[vision_encoder,connector,language_model]"
LORA = [
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.parts=[vision_encoder,language_model]",
    "model.lora.fully_trained=[connector]",
]


def _save_checkpoint(model, cfg, folder, parts_filter=None):
    """A published one-step save folder of ``model`` (only the keys ``parts_filter`` keeps)."""
    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR
    from mm1_megatron.config import save_config

    step = folder / "step_00000000"
    (step / MODEL_OPTIM_DIR).mkdir(parents=True)
    sharded = model.sharded_state_dict()
    if parts_filter is not None:
        sharded = {k: v for k, v in sharded.items() if parts_filter(k)}
    dist_checkpointing.save({"model": sharded}, str(step / MODEL_OPTIM_DIR))
    save_config(cfg, step / "config.yaml")
    return step


def _build_lora_checkpoint(conversion_dir, name: str, lora: list):
    """(LoRA save folder, base save folder, our adapted model, its config): a randomised
    base saved as a published checkpoint, and a LoRA run's checkpoint on it."""
    from mm1_megatron.checkpoint.adapters import base_record, write_base_record
    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import megatron_io
    from mm1_megatron.models.lora import is_adapter_key
    from tests.conftest import DEBUG_CONFIG, TINY_OVERRIDES
    from tests.conversion.hf_sources import randomize

    base_cfg = load_config(DEBUG_CONFIG, list(TINY_OVERRIDES))
    base = megatron_io.build_tp1_model(base_cfg.model, image_token_id=3, seed=5)
    randomize(base, seed=5)
    base_folder = conversion_dir / f"{name}_base"
    step = _save_checkpoint(base, base_cfg, base_folder)
    megatron_io.write_published_checkpoint(base_folder, step.name)

    cfg = load_config(DEBUG_CONFIG, [*TINY_OVERRIDES, *lora])
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=3, seed=5)
    model.load_state_dict(base.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # adapters, and any part trained in full
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    trained_parts = tuple(f"{part}." for part in cfg.model.lora.fully_trained)
    folder = conversion_dir / f"{name}_run"
    step = _save_checkpoint(
        model, cfg, folder, lambda k: is_adapter_key(k) or k.startswith(trained_parts)
    )
    write_base_record(step, base_record(str(base_folder)))
    megatron_io.write_published_checkpoint(folder, step.name)
    return folder, base_folder, model.eval(), cfg


@pytest.fixture(scope="module")
def lora_checkpoint(conversion_dir, megatron_single_process):
    return _build_lora_checkpoint(conversion_dir, "lora", LORA)


def _logits_pair(model, exported):
    tokens, images = _prompt()
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, torch.zeros_like(tokens), images=images)
        theirs = exported(input_ids=tokens, pixel_values=images).logits
    return ours, theirs


def _prompt():
    tokens = torch.tensor([[1] + [3] * 4 + list(range(10, 30))])
    return tokens, torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(7))


def test_merged_export_computes_the_adapted_model(lora_checkpoint, conversion_dir):
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401

    folder, _, model, _ = lora_checkpoint
    exported_folder = export_to(folder, conversion_dir / "lora_merged")
    exported = AutoModelForImageTextToText.from_pretrained(exported_folder).eval()
    ours, theirs = _logits_pair(model, exported)
    assert (ours - theirs).abs().max() <= TOLERANCE
    # The adapters matter: the base alone computes something else.
    base = AutoModelForImageTextToText.from_pretrained(
        export_to(lora_checkpoint[1], conversion_dir / "lora_base_export")
    ).eval()
    assert (ours - _logits_pair(model, base)[1]).abs().max() > 1e-2


def test_moved_base_is_named_and_found_with_base(lora_checkpoint, conversion_dir):
    from mm1_megatron.conversion.errors import ConversionError

    folder, base_folder, _, _ = lora_checkpoint
    moved = conversion_dir / "lora_base_moved"
    shutil.copytree(base_folder, moved)
    shutil.move(str(base_folder), str(conversion_dir / "lora_base_elsewhere"))
    try:
        with pytest.raises(ConversionError, match="pass its new place with --base"):
            export_to(folder, conversion_dir / "lora_no_base")
        export_to(folder, conversion_dir / "lora_with_base", base=moved)
    finally:
        shutil.move(str(conversion_dir / "lora_base_elsewhere"), str(base_folder))


def test_another_base_is_refused(lora_checkpoint, conversion_dir, megatron_single_process):
    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import megatron_io
    from mm1_megatron.conversion.errors import ConversionError
    from tests.conftest import DEBUG_CONFIG, TINY_OVERRIDES

    folder = lora_checkpoint[0]
    cfg = load_config(DEBUG_CONFIG, list(TINY_OVERRIDES))
    other = conversion_dir / "lora_other_base"
    step = _save_checkpoint(megatron_io.build_tp1_model(cfg.model, image_token_id=3), cfg, other)
    megatron_io.write_published_checkpoint(other, step.name)
    with pytest.raises(ConversionError, match="is not the base the checkpoint"):
        export_to(folder, conversion_dir / "lora_other", base=other)


# Runs where mm1_megatron cannot be imported: the exported base's own model code
# (trust_remote_code) and PEFT.
PEFT_CHECK = (
    WITHOUT_OUR_PACKAGE
    + """
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
base_folder, adapter_folder, reference = sys.argv[1], sys.argv[2], load_file(sys.argv[3])
base = AutoModelForImageTextToText.from_pretrained(base_folder, trust_remote_code=True)
model = PeftModel.from_pretrained(base, adapter_folder).eval()
with torch.no_grad():
    logits = model(input_ids=reference["tokens"], pixel_values=reference["images"]).logits
print("max_abs_diff", float((logits - reference["logits"]).abs().max()))
print("adapted", sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")))
print("loaded_mm1_megatron", any(m.startswith("mm1_megatron") for m in sys.modules))
"""
)


def test_peft_adapter_loads_on_the_exported_base_without_our_package(
    conversion_dir, megatron_single_process
):
    from safetensors.torch import save_file

    lora = ["model.lora.rank=4", "model.lora.alpha=8", ALL_PARTS]
    folder, base_folder, model, _ = _build_lora_checkpoint(conversion_dir, "peft", lora)
    base_export = export_to(base_folder, conversion_dir / "peft_base_export")
    adapter = export_to(folder, conversion_dir / "peft_adapter", adapter=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    # Decoder: 2 layers x (q, k, v, o, gate, up, down); ViT: 1 layer x (q, k, v, out,
    # fc1, fc2); the connector's two readout Linears.
    assert len(config["target_modules"]) == 14 + 6 + 2
    tokens, images = _prompt()
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = model(tokens, positions, torch.zeros_like(tokens), images=images)
    reference = conversion_dir / "peft_reference.safetensors"
    save_file({"tokens": tokens, "images": images, "logits": logits}, str(reference))
    result = subprocess.run(
        [sys.executable, "-c", PEFT_CHECK, str(base_export), str(adapter), str(reference)],
        cwd=conversion_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert float(lines["max_abs_diff"]) <= TOLERANCE
    assert lines["adapted"] == "22" and lines["loaded_mm1_megatron"] == "False"


def test_adapter_export_refuses_fully_trained_parts(lora_checkpoint, conversion_dir):
    from mm1_megatron.conversion.errors import ConversionError

    with pytest.raises(ConversionError, match="export the merged model instead"):
        export_to(lora_checkpoint[0], conversion_dir / "lora_as_peft", adapter=True)
