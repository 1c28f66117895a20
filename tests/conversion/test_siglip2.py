"""SigLIP 2 NaFlex towers: import parity on packed images of several aspect ratios at TP=1
(this process) and TP=2 (the session's pool of 2 ranks, loading the way training does),
a bit-exact import -> export round trip, and an export that loads as
``Siglip2VisionModel`` and computes our features."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.conversion.conftest import TOLERANCE, export_to
from tests.conversion.hf_sources import (
    SIGLIP2_MAX_PATCHES,
    build_siglip2_source,
    siglip2_features,
)
from tests.rank_pool import session_pools

logger = logging.getLogger(__name__)
# Patch grids of the packed images: the 4x4 table as it is, shrunk along one axis and
# stretched along the other, shrunk by a non-integer factor, stretched along both.
GRIDS = [(4, 4), (2, 8), (8, 2), (3, 5), (5, 6)]
PATCH = 4
SOURCES = ("siglip2_vision", "siglip2")  # Siglip2VisionModel, Siglip2Model


@pytest.fixture(scope="module")
def siglip2(conversion_dir, megatron_single_process):
    """name -> (the source's vision tower, its folder, our import of it)."""
    from mm1_megatron.conversion import ImportRequest, import_checkpoint

    built = {}
    for seed, name in enumerate(SOURCES, start=40):
        folder = conversion_dir / "hf" / name
        tower = build_siglip2_source(name, folder, seed=seed)
        output = conversion_dir / "imported" / name
        import_checkpoint(ImportRequest(output=output, vision_encoder=folder))
        built[name] = (tower, folder, output)
    return built


@pytest.fixture(scope="module")
def packed(conversion_dir):
    """``(patches [total, c*p*p], grid sizes, their inputs file)``."""
    from safetensors.torch import save_file

    from mm1_megatron.batch.image_patches import patchify

    generator = torch.Generator().manual_seed(7)
    images = [torch.randn(3, h * PATCH, w * PATCH, generator=generator) for h, w in GRIDS]
    patches = torch.cat([patchify(image, PATCH) for image in images])
    path = conversion_dir / "siglip2_inputs.safetensors"
    save_file({"patches": patches, "grid_sizes": torch.tensor(GRIDS)}, str(path))
    return patches, GRIDS, path


def _load_tp1(folder):
    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import megatron_io

    step = megatron_io.resolve_step_folder(folder)
    cfg = load_config(step / "config.yaml")
    model = megatron_io.build_tp1_model(
        megatron_io.placeholder_model_config(cfg.model, ["vision_encoder"]),
        image_token_id=0,
        seed=99,
    )
    megatron_io.load_parts(model, step, ["vision_encoder"])
    return model.eval()


def _per_image_diffs(ours, reference, label: str):
    counts = [h * w for h, w in GRIDS]
    diffs = {
        grid: float((a - b).abs().max())
        for grid, a, b in zip(GRIDS, ours.split(counts), reference.split(counts))
    }
    for grid, diff in diffs.items():
        logger.info("%s %dx%d max abs diff %.3g", label, *grid, diff)
    return diffs


def test_config_maps_to_a_native_resolution_siglip_tower(siglip2):
    from mm1_megatron.config import load_config

    for name, expected_budget in (("siglip2_vision", SIGLIP2_MAX_PATCHES), ("siglip2", 256)):
        step = siglip2[name][2] / "step_00000000"
        vision = load_config(step / "config.yaml").model.vision
        assert vision.native_resolution and vision.max_patches == expected_budget
        assert (vision.image_size, vision.patch_size) == (4 * PATCH, PATCH)  # a 4x4 table
        assert (vision.use_class_token, vision.pre_layernorm) == (False, False)
        assert vision.patch_embedding_bias and vision.post_layernorm
        assert (vision.activation, vision.layernorm_epsilon) == ("gelu_tanh", 1e-6)
        assert vision.image_mean == vision.image_std == [0.5, 0.5, 0.5]
        info = json.loads((step / "conversion.json").read_text())
        assert any("head.*" in warning for warning in info["warnings"])


@pytest.mark.parametrize("name", SOURCES)
def test_packed_images_match_transformers_at_tp1(name, siglip2, packed):
    tower, _, imported = siglip2[name]
    patches, grids, _ = packed
    model = _load_tp1(imported)
    with torch.no_grad():
        ours = model.vision_encoder.encode_packed(patches, grids)
    diffs = _per_image_diffs(ours, siglip2_features(tower, patches, grids), f"{name} TP=1")
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_packed_images_match_transformers_at_tp2(siglip2, packed, conversion_dir):
    tower, _, imported = siglip2["siglip2_vision"]
    patches, grids, inputs = packed
    out = conversion_dir / "siglip2_worker"
    out.mkdir()
    load = {
        "name": "siglip2_vision_tp2",
        "checkpoint": str(imported),
        "part": "vision_encoder",
        "parallel": {"tensor_parallel_size": 2},
        "inputs": str(inputs),
    }
    spec = out / "spec.json"
    spec.write_text(json.dumps({"loads": [load]}))
    session_pools()(2).run("tests.conversion.conversion_worker:run_spec", str(spec), str(out))
    from safetensors.torch import load_file

    ours = load_file(str(out / "siglip2_vision_tp2.safetensors"))["output"]
    diffs = _per_image_diffs(ours, siglip2_features(tower, patches, grids), "TP=2")
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.fixture(scope="module")
def round_trips(siglip2, conversion_dir):
    return {
        name: export_to(siglip2[name][2], conversion_dir / "round_trip" / name) for name in SOURCES
    }


@pytest.mark.parametrize("name", SOURCES)
def test_import_export_round_trip_is_bit_exact(name, siglip2, round_trips):
    from mm1_megatron.conversion.safetensors_io import SafetensorsFolder

    source, exported = SafetensorsFolder(siglip2[name][1]), SafetensorsFolder(round_trips[name])
    anchor = "embeddings.patch_embedding.weight"
    source_prefix, exported_prefix = source.find_prefix(anchor), exported.find_prefix(anchor)
    names = {
        key[len(source_prefix) :]
        for key in source.keys()
        if key.startswith(source_prefix) and not key.startswith(f"{source_prefix}head.")
    }
    assert names == {key[len(exported_prefix) :] for key in exported.keys()}
    for key in sorted(names):
        assert torch.equal(source.get(source_prefix + key), exported.get(exported_prefix + key))


@pytest.mark.parametrize("name", SOURCES)
def test_export_loads_as_siglip2_vision_model_and_matches(name, siglip2, round_trips, packed):
    from transformers import AutoImageProcessor, Siglip2VisionModel

    folder = round_trips[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "siglip2_vision_model" and not config["vision_use_head"]
    assert config["architectures"] == ["Siglip2VisionModel"] and config["num_patches"] == 16
    model, info = Siglip2VisionModel.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    patches, grids, _ = packed
    theirs = siglip2_features(model.eval(), patches, grids)
    assert torch.equal(theirs, siglip2_features(siglip2[name][0], patches, grids))
    ours = _load_tp1(siglip2[name][2]).vision_encoder.encode_packed(patches, grids).detach()
    assert max(_per_image_diffs(ours, theirs, f"{name} export").values()) <= TOLERANCE
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__.startswith("Siglip2ImageProcessor")
    budget = SIGLIP2_MAX_PATCHES if name == "siglip2_vision" else 256
    assert (processor.patch_size, processor.max_num_patches) == (PATCH, budget)


def test_non_square_position_table_is_refused(conversion_dir):
    from transformers import Siglip2VisionConfig

    from mm1_megatron.conversion.errors import ConversionError
    from mm1_megatron.conversion.source_configs import vision_source

    folder = conversion_dir / "hf" / "siglip2_non_square"
    Siglip2VisionConfig(num_patches=20).save_pretrained(str(folder))
    with pytest.raises(ConversionError, match="num_patches.*square"):
        vision_source(folder)
