"""Export of a LoRA run's checkpoint (adapters only) merged into its base: the exported
``transformers`` model computes what our adapted model computes (adapters unmerged), the
base is found by its record or ``--base``, and a base that is not the one trained on is
refused."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conversion.conftest import TOLERANCE, export_to

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


@pytest.fixture(scope="module")
def lora_checkpoint(conversion_dir, megatron_single_process):
    """(LoRA save folder, base save folder, our adapted model, its config)."""
    from mm1_megatron.checkpoint.adapters import base_record, write_base_record
    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import megatron_io
    from mm1_megatron.models.lora import is_adapter_key
    from tests.conftest import DEBUG_CONFIG, TINY_OVERRIDES
    from tests.conversion.hf_sources import randomize

    base_cfg = load_config(DEBUG_CONFIG, list(TINY_OVERRIDES))
    base = megatron_io.build_tp1_model(base_cfg.model, image_token_id=3, seed=5)
    randomize(base, seed=5)
    base_folder = conversion_dir / "lora_base"
    step = _save_checkpoint(base, base_cfg, base_folder)
    megatron_io.write_published_checkpoint(base_folder, step.name)

    cfg = load_config(DEBUG_CONFIG, [*TINY_OVERRIDES, *LORA])
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=3, seed=5)
    model.load_state_dict(base.state_dict(), strict=False)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:  # adapters, and the connector trained in full
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    folder = conversion_dir / "lora_run"
    step = _save_checkpoint(
        model, cfg, folder, lambda k: is_adapter_key(k) or k.startswith("connector.")
    )
    write_base_record(step, base_record(str(base_folder)))
    megatron_io.write_published_checkpoint(folder, step.name)
    return folder, base_folder, model, cfg


def _logits_pair(model, exported):
    tokens = torch.tensor([[1] + [3] * 4 + list(range(10, 30))])
    images = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, torch.zeros_like(tokens), images=images)
        theirs = exported(input_ids=tokens, pixel_values=images).logits
    return ours, theirs


def test_merged_export_computes_the_adapted_model(lora_checkpoint, conversion_dir):
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401

    folder, _, model, _ = lora_checkpoint
    exported_folder = export_to(folder, conversion_dir / "lora_merged")
    exported = AutoModelForImageTextToText.from_pretrained(exported_folder).eval()
    ours, theirs = _logits_pair(model.eval(), exported)
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
    with pytest.raises(ConversionError, match="is not the base the LoRA checkpoint"):
        export_to(folder, conversion_dir / "lora_other", base=other)
