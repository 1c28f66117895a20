"""``--format mm1`` export of a model with a native-resolution ViT (SigLIP 2 NaFlex).

A tiny MM1 model whose ViT has SigLIP's stem and ``native_resolution: true`` (14-px
patches, a 4x4 position table, at most 32 patches per image, a C-Abstractor of 4 tokens)
is randomised, saved as a checkpoint and exported. The export's vision tower is a
``Siglip2VisionModel`` and its image processor ``Siglip2ImageProcessor``; ``MM1Processor``
passes its ``pixel_values`` / ``pixel_attention_mask`` / ``spatial_shapes`` on and gives
every image ``num_image_tokens`` image tokens. On PIL images of five aspect ratios:

- in this process (the folder loaded with ``trust_remote_code=True``, through our
  registered classes), the logits equal our Megatron model's on the same patches
  (``encode_packed`` -> connector on the images' grids -> decoder) within 1e-4, and the
  tower computes exactly what ``Siglip2VisionModel`` (the ``vision-encoder`` export) does;
- in a process where ``mm1_megatron`` and ``megatron`` cannot be imported
  (``sft_transformers_side.py pipeline``), the processor gives the same inputs, the model
  the same logits, greedy ``generate()`` our greedy tokens, and
  ``pipeline("image-text-to-text")`` answers on two images of different aspect ratios as
  ``generate()`` does.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import NATIVE_OVERRIDES, make_tiny_config
from tests.conversion.conftest import TOLERANCE, export_to
from tests.launch import clean_env

logger = logging.getLogger(__name__)
SIDE = Path(__file__).with_name("sft_transformers_side.py")

NATIVE = (*NATIVE_OVERRIDES, "model.vision.max_patches=32", "model.vision.num_layers=2")
PATCH, MAX_PATCHES, NUM_IMAGE_TOKENS = 14, 32, 4
# (height, width) of the test images -> the patch grid Siglip2ImageProcessor gives them
# (at most 32 patches, aspect kept): square, wide, tall, 3:5, a long strip.
IMAGES = {
    "square": ((100, 100), (5, 5)),
    "wide": ((60, 200), (3, 10)),
    "tall": ((200, 60), (10, 3)),
    "three_by_five": ((90, 150), (4, 7)),
    "strip": ((30, 400), (2, 16)),
}
MAX_NEW_TOKENS = 4
TEXT = " a red circle and"
# One prompt per image, and one with all of them (one padded batch through the tower).
CASES = {
    **{name: {"text": "<image>" + TEXT, "images": [name]} for name in IMAGES},
    "all": {"text": "<image> " * len(IMAGES) + "there are", "images": list(IMAGES)},
}


@pytest.fixture(scope="module")
def native(conversion_dir, megatron_single_process):
    """``(our model, the mm1 export, the vision-encoder export, the images' PNG files)``."""
    from mm1_megatron.config import save_config
    from mm1_megatron.config.schema import MODEL_PARTS
    from mm1_megatron.conversion import megatron_io
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from tests.conversion.hf_sources import randomize

    cfg = make_tiny_config(*NATIVE)
    image_id = SyntheticTokenizer().image_token_id
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=image_id, seed=21)
    randomize(model, seed=21)
    step = conversion_dir / "native" / "ckpt" / "step_00000000"
    megatron_io.save_parts(model, step, MODEL_PARTS)
    save_config(cfg, step / "config.yaml")
    megatron_io.write_published_checkpoint(step.parent, step.name)
    mm1 = export_to(step.parent, conversion_dir / "native" / "mm1")
    tower = export_to(step.parent, conversion_dir / "native" / "tower", format="vision-encoder")
    return model.eval(), mm1, tower, _write_images(conversion_dir / "native")


def _write_images(folder: Path) -> dict:
    from PIL import Image

    rng = np.random.default_rng(27)
    paths = {}
    for name, ((height, width), _) in IMAGES.items():
        paths[name] = str(folder / f"{name}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def side(native, tmp_path_factory):
    """Runs ``sft_transformers_side.py pipeline`` on the export: the pipeline on two images
    of different aspect ratios, and every case of ``CASES`` through ``AutoProcessor`` /
    ``AutoModelForImageTextToText``. Returns ``(report, case -> tensors)``."""
    from safetensors.torch import load_file

    _, folder, _, paths = native
    out = tmp_path_factory.mktemp("native_side")
    pipeline_case = {
        "name": "two_aspect_ratios",
        "export": "native",
        "text": "<image> <image> there are",
        "images": [paths["wide"], paths["tall"]],
    }
    logits_cases = [
        {"name": name, "export": "native", "text": case["text"], "images": _paths(case, paths)}
        for name, case in CASES.items()
    ]
    spec = {
        "exports": {"native": str(folder)},
        "cases": [pipeline_case],
        "logits_cases": logits_cases,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    (out / "spec.json").write_text(json.dumps(spec))
    env = clean_env(HF_MODULES_CACHE=str(out / "hf_modules"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-I", str(SIDE), "pipeline", "spec.json", "out.json"]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "out.json").read_text())
    return report, {name: load_file(str(out / f"{name}.safetensors")) for name in CASES}


def _paths(case: dict, paths: dict) -> list:
    return [paths[name] for name in case["images"]]


@pytest.fixture(scope="module")
def exported_model(native):
    """The export loaded in this process; our package is registered, so the same code
    runs from our modules rather than the folder's copies."""
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"

    _, folder, _, _ = native
    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True
    )
    assert not any(info.values()), info
    return model.eval()


@pytest.fixture(scope="module")
def processed(native):
    """case -> the exported processor's ``BatchFeature`` for it, in this process."""
    from PIL import Image

    import mm1_megatron.hf_model.register  # noqa: F401  the tokenizer reads model_type "mm1"
    from mm1_megatron.hf_model.processing_mm1 import MM1Processor

    _, folder, _, paths = native
    processor = MM1Processor.from_pretrained(folder)
    return {
        name: processor(
            text=case["text"],
            images=[Image.open(path) for path in _paths(case, paths)],
            return_tensors="pt",
        )
        for name, case in CASES.items()
    }


# ---- ours: the Megatron model on the same patches ------------------------------------


def _packed(batch) -> tuple:
    """The processor's padded patches as ours take them: packed, with their grids."""
    grids = [tuple(shape) for shape in batch["spatial_shapes"].tolist()]
    rows = [pixels[: h * w] for pixels, (h, w) in zip(batch["pixel_values"], grids)]
    return torch.cat(rows), grids


def _our_logits(model, tokens: torch.Tensor, patches, grids) -> torch.Tensor:
    """``[s, vocab]`` logits of our model on ``tokens`` ``[1, s]`` with these images:
    ``encode_packed`` -> the connector on the images' grids -> merged into the decoder's
    input."""
    from mm1_megatron.batch.contract import merge_image_embeddings

    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        embeddings = model.language_model.embedding(input_ids=tokens, position_ids=None)
        image_tokens = model.connector(model.vision_encoder.encode_packed(patches, grids), grids)
        merged = merge_image_embeddings(
            embeddings, image_tokens, tokens, image_token_id=model.image_token_id
        )
        logits = model.language_model(
            tokens, positions, torch.zeros_like(positions), decoder_input=merged
        )
    return logits[0]


def _our_greedy(model, tokens: torch.Tensor, patches, grids, stops) -> list:
    """Greedy decoding by full forwards (prompt included), ``MAX_NEW_TOKENS`` at most."""
    ids = tokens
    for _ in range(MAX_NEW_TOKENS):
        token = int(_our_logits(model, ids, patches, grids)[-1].argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token in stops:
            break
    return ids[0].tolist()


def _stop_ids(folder) -> set:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


# ---- the folder -----------------------------------------------------------------------


def test_export_writes_a_siglip2_tower_and_its_image_processor(native):
    _, folder, _, _ = native
    config = json.loads((folder / "config.json").read_text())
    vision = config["vision_config"]
    assert vision["model_type"] == "siglip2_vision_model" and not vision["vision_use_head"]
    assert (vision["patch_size"], vision["num_patches"]) == (PATCH, 16)
    assert config["num_image_tokens"] == NUM_IMAGE_TOKENS
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    assert settings["image_processor_type"] == "Siglip2ImageProcessor"
    assert (settings["patch_size"], settings["max_num_patches"]) == (PATCH, MAX_PATCHES)
    mean_std = make_tiny_config(*NATIVE).model.vision
    assert (settings["image_mean"], settings["image_std"]) == (
        list(mean_std.image_mean),
        list(mean_std.image_std),
    )
    processor = json.loads((folder / "processor_config.json").read_text())
    assert processor["processor_class"] == "MM1Processor"
    assert processor["num_image_tokens"] == NUM_IMAGE_TOKENS
    assert "Siglip2VisionModel" in (folder / "README.md").read_text()


def test_the_processor_gives_each_image_its_grid_and_one_run_of_image_tokens(native, processed):
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

    image_id = SyntheticTokenizer().image_token_id
    for name, case in CASES.items():
        batch = processed[name]
        count = len(case["images"])
        assert batch["pixel_values"].shape == (count, MAX_PATCHES, 3 * PATCH * PATCH)
        grids = [IMAGES[image][1] for image in case["images"]]
        assert batch["spatial_shapes"].tolist() == [list(grid) for grid in grids]
        assert batch["pixel_attention_mask"].sum(-1).tolist() == [h * w for h, w in grids]
        assert batch["num_tiles"].tolist() == [1] * count
        assert int((batch["input_ids"] == image_id).sum()) == count * NUM_IMAGE_TOKENS


# ---- this process: logits and the vision tower ------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_logits_match_ours(case, native, exported_model, processed):
    model = native[0]
    batch = processed[case]
    with torch.no_grad():
        theirs = exported_model(**batch).logits[0]
    ours = _our_logits(model, batch["input_ids"], *_packed(batch))
    diff = float((ours - theirs).abs().max())
    logger.info("native export %s: logits max abs diff %.3g", case, diff)
    assert diff <= TOLERANCE


def test_the_pixel_path_is_siglip2_vision_model(native, exported_model, processed):
    from transformers import Siglip2VisionModel

    model, _, tower_folder, _ = native
    assert type(exported_model.vision_tower) is Siglip2VisionModel
    tower = Siglip2VisionModel.from_pretrained(tower_folder).eval()
    batch = processed["all"]
    inputs = {key: batch[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    with torch.no_grad():
        theirs = tower(**inputs).last_hidden_state
        exported = exported_model.vision_tower(**inputs).last_hidden_state
        patches, grids = _packed(batch)
        ours = model.vision_encoder.encode_packed(patches, grids)
    assert torch.equal(exported, theirs)
    for index, (h, w) in enumerate(grids):
        start = sum(a * b for a, b in grids[:index])
        diff = float((ours[start : start + h * w] - theirs[index, : h * w]).abs().max())
        logger.info("native export %dx%d grid: ViT features max abs diff %.3g", h, w, diff)
        assert diff <= TOLERANCE, (grids[index], diff)


def test_native_inputs_are_required(exported_model, processed):
    batch = processed["square"]
    with pytest.raises(ValueError, match="pixel_attention_mask and spatial_shapes"):
        exported_model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    shapes = batch["spatial_shapes"].flip(-1) + 1  # not what the mask holds
    with pytest.raises(ValueError, match="rows \\* cols"):
        exported_model(**{**batch, "spatial_shapes": shapes})


# ---- where our package cannot be imported -----------------------------------------------


def test_the_export_runs_on_its_own_code_alone(side):
    report, _ = side
    assert report["loaded"] == [], report["loaded"]
    assert all(module.startswith("transformers_modules.") for module in report["classes"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_standalone_logits_and_generation_match_ours(case, native, side, processed):
    model, folder, _, _ = native
    theirs = side[1][case]
    for key in ("input_ids", "pixel_values", "pixel_attention_mask", "spatial_shapes"):
        expected = processed[case][key]
        assert torch.equal(theirs[key], expected[0] if key == "input_ids" else expected), key
    tokens = theirs["input_ids"][None]
    patches, grids = _packed(theirs)
    diff = float((_our_logits(model, tokens, patches, grids) - theirs["logits"]).abs().max())
    logger.info("native export %s without our package: logits max abs diff %.3g", case, diff)
    assert diff <= TOLERANCE
    greedy = _our_greedy(model, tokens, patches, grids, _stop_ids(folder))
    assert theirs["generated"].tolist() == greedy
    assert len(greedy) > tokens.shape[1]


def test_the_pipeline_answers_on_two_aspect_ratios_as_generate_does(side):
    report, _ = side
    result = report["cases"]["two_aspect_ratios"]
    assert result["ids"] == result["reference_ids"]
    assert len(result["reference_ids"]) > result["prompt_length"]
    assert result["new_text"].strip() == result["reference_text"].strip()


# ---- refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("connector.type", "mlp", "model.connector.type=mlp"),
        ("tiling.mode", "static", "data.tiling.mode=static"),
    ],
)
def test_configs_the_export_cannot_serve_are_refused(field, value, message):
    from mm1_megatron.conversion.errors import ConversionError
    from mm1_megatron.conversion.export_layouts import mm1_config

    cfg = make_tiny_config(*NATIVE)
    section = cfg.model.connector if field.startswith("connector") else cfg.data.tiling
    setattr(section, field.split(".")[1], value)  # past validation, as an old config might be
    with pytest.raises(ConversionError, match=message):
        mm1_config(cfg, {"image": 0}, "float32")
