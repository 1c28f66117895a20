"""Native resolution in the data pipeline: SigLIP 2's size rule (checked against
transformers' own function and its image processor), and micro-batches of packed patches
with their grids from the synthetic world and from shards, in and out of workers."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mm1_megatron.batch.image_patches import patchify
from mm1_megatron.config.schema import DataConfig, ShardsConfig
from mm1_megatron.data import BATCH_KEYS, NATIVE_BATCH_KEYS
from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline.images import build_image_decoder, image_size_of
from mm1_megatron.data.pipeline.native_resolution import NativeResolution
from mm1_megatron.data.shards.ingest import coco_items, jsonl_texts
from mm1_megatron.data.shards.text_index import build_text_index
from mm1_megatron.data.shards.writer import build_shards
from mm1_megatron.data.synthetic.world import (
    ASPECT_RATIOS,
    Scene,
    ShapeSpec,
    draw_scene,
    shape_mask,
)
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.conftest import NATIVE_OVERRIDES, make_tiny_config
from tests.data.corpus_fixtures import make_coco, make_text_jsonl

PATCH, BUDGET, SEQ, NUM_IMAGE_TOKENS = 14, 16, 256, 4
NATIVE = NativeResolution(PATCH, BUDGET)
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
TOK = SyntheticTokenizer()


def _transformers_size(height, width, patch, budget):
    from transformers.models.siglip2.image_processing_pil_siglip2 import (
        get_image_size_for_max_num_patches,
    )

    return get_image_size_for_max_num_patches(height, width, patch, budget)


# ---- the size rule ----------------------------------------------------------------------


def _random_cases(count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        longest = rng.choice([20, 400, 5000])
        yield (
            rng.randint(1, longest),
            rng.randint(1, longest),
            rng.choice([1, 4, 14, 16, 32]),
            rng.choice([1, 7, 16, 64, 256, 729, 1024]),
        )


EDGE_CASES = [
    (1, 1, 16, 256),  # enlarged, at most 100x
    (10, 10000, 14, 16),  # a strip: one patch high
    (10000, 10, 14, 16),
    (384, 384, 16, 576),  # already a grid within the budget
    (4270, 3202, 16, 16),  # the search settles one row short of the exact optimum
]


@pytest.mark.parametrize("chunk", range(4))
def test_sizes_are_transformers_sizes(chunk):
    cases = list(_random_cases(500, seed=chunk)) + EDGE_CASES
    for height, width, patch, budget in cases:
        ours = NativeResolution(patch, budget).image_size(height, width)
        assert ours == _transformers_size(height, width, patch, budget), (height, width)


def test_sizes_keep_within_the_budget_in_whole_patches():
    for height, width, patch, budget in _random_cases(300, seed=9):
        rule = NativeResolution(patch, budget)
        rows, cols = rule.grid(height, width)
        assert rule.image_size(height, width) == (rows * patch, cols * patch)
        assert rows >= 1 and cols >= 1 and rows * cols <= budget


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("height, width", [(37, 91), (300, 200), (9, 9), (1000, 15), (56, 56)])
def test_patches_are_siglip2_image_processor_pixel_values(height, width):
    from transformers import Siglip2ImageProcessor

    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), np.uint8)
    blob = _png(pixels)
    decoder = build_image_decoder("pil", image_size=56, mean=MEAN, std=STD, native=NATIVE)
    (image,) = decoder.decode([blob])
    patches, grids = NATIVE.pack([image])
    processor = Siglip2ImageProcessor(
        patch_size=PATCH, max_num_patches=BUDGET, image_mean=MEAN, image_std=STD
    )
    theirs = processor(images=[Image.open(io.BytesIO(blob))], return_tensors="pt")
    assert grids.tolist() == theirs["spatial_shapes"].tolist()
    count = int(theirs["pixel_attention_mask"][0].sum())
    assert count == patches.shape[0]
    torch.testing.assert_close(patches, theirs["pixel_values"][0, :count], rtol=0, atol=1e-5)


def test_pack_lays_images_out_one_after_another():
    images = [torch.randn(3, h * PATCH, w * PATCH) for h, w in [(2, 8), (4, 4), (1, 1)]]
    patches, grids = NATIVE.pack(images)
    assert grids.dtype == torch.int64 and grids.tolist() == [[2, 8], [4, 4], [1, 1]]
    assert torch.equal(patches, torch.cat([patchify(image, PATCH) for image in images]))


@pytest.mark.parametrize(
    "shape, message",
    [((3, 20, 28), "whole 14-px patches"), ((3, 70, 70), "max_patches=16"), ((1, 14, 14), "3")],
)
def test_pack_refuses_images_not_resized_by_the_rule(shape, message):
    with pytest.raises(ValueError, match=message):
        NATIVE.pack([torch.zeros(shape)])


# ---- micro-batches ----------------------------------------------------------------------


def _loader(data: DataConfig, native=NATIVE, micro_batch_size=4, seed=0):
    loader, _ = build_data(
        data,
        seq_length=SEQ,
        micro_batch_size=micro_batch_size,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_size=56,
        image_mean=MEAN,
        image_std=STD,
        seed=seed,
        dp_rank=0,
        dp_size=1,
        native=native,
    )
    return loader


def _check_native_batch(batch):
    """The contract of ``batch/contract.py``: packed patches, their grids, in order."""
    assert set(batch) == set(NATIVE_BATCH_KEYS)
    grids, images = batch["image_grids"], batch["images"]
    assert grids.dtype == torch.int64 and grids.shape == (int(batch["num_images"].sum()), 2)
    assert images.shape == (int(grids.prod(dim=1).sum()), 3 * PATCH * PATCH)
    assert (grids.prod(dim=1) <= BUDGET).all() and (grids >= 1).all()
    placeholders = int((batch["tokens"] == TOK.image_token_id).sum())
    assert placeholders == NUM_IMAGE_TOKENS * grids.shape[0]


def test_synthetic_batches_pack_images_of_every_aspect_ratio():
    loader = _loader(DataConfig(source="synthetic"))
    seen = set()
    for _ in range(6):
        batch = next(loader)
        _check_native_batch(batch)
        seen |= {tuple(grid) for grid in batch["image_grids"].tolist()}
    assert len(seen) == len(ASPECT_RATIOS) >= 4, seen  # one grid per ratio at this budget


def test_synthetic_batches_are_deterministic_and_workers_deliver_them_in_shared_memory():
    data = DataConfig(source="synthetic")
    plain = _loader(data)
    worked = _loader(DataConfig(source="synthetic", num_workers=1))
    for _ in range(3):
        a, b = next(plain), next(worked)
        assert all(torch.equal(a[key], b[key]) for key in NATIVE_BATCH_KEYS)
        assert b["images"].is_shared()
    worked.close()


def test_fixed_size_batches_keep_their_keys_and_change_their_fingerprint():
    data = DataConfig(source="synthetic")
    square = _loader(data, native=None)
    batch = next(square)
    assert set(batch) == set(BATCH_KEYS) and batch["images"].dim() == 4
    assert square.fingerprint != _loader(data).fingerprint


@pytest.fixture(scope="module")
def caption_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_corpus")
    captions, images = make_coco(root / "coco", 12)
    items = list(coco_items(captions, images))
    build_shards(
        items, root / "caption", kind="caption", samples_per_shard=5, input_id="t", progress=False
    )
    sizes = [image_size_of((images / path.name).read_bytes()) for path in images.iterdir()]
    text = make_text_jsonl(root / "text", 8)
    build_text_index(jsonl_texts([text]), root / "text" / "corpus", TOK, progress=False)
    return root, sizes


def _shard_data(root, mixture) -> DataConfig:
    return DataConfig(
        source="webdataset",
        shards=ShardsConfig(caption=[str(root / "caption")], text=[str(root / "text/corpus")]),
        mixture=mixture,
        max_images_per_sequence=4,
        caption_window=4,
    )


def test_shard_batches_resize_each_image_by_the_rule(caption_corpus):
    root, sizes = caption_corpus
    rule_grids = {NATIVE.grid(height, width) for width, height in sizes}
    assert len(rule_grids) > 1  # the corpus has several aspect ratios
    loader = _loader(_shard_data(root, {"caption": 1}), micro_batch_size=2)
    for _ in range(3):
        batch = next(loader)
        _check_native_batch(batch)
        assert {tuple(grid) for grid in batch["image_grids"].tolist()} <= rule_grids


def test_text_batches_carry_empty_patches_and_grids(caption_corpus):
    root, _ = caption_corpus
    batch = next(_loader(_shard_data(root, {"text": 1}), micro_batch_size=2))
    _check_native_batch(batch)
    assert batch["images"].shape == (0, 3 * PATCH * PATCH) and batch["image_grids"].numel() == 0


# ---- refused settings -------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (["data.tiling.mode=static"], ["data.tiling.mode=static", "data.tiling.mode=none"]),
        (
            ["data.source=webdataset", "data.images.decoder=dali"],
            ["data.images.decoder=dali", "data.images.decoder=pil"],
        ),
        (["model.connector.type=mlp"], ["model.connector.type=mlp"]),
        (
            ["model.connector.num_output_tokens=25", "model.vision.max_patches=16"],
            ["model.connector.num_output_tokens=25", "model.vision.max_patches=16"],
        ),
    ],
)
def test_settings_native_resolution_does_not_go_with_are_refused(overrides, fields):
    with pytest.raises(ValueError) as error:
        make_tiny_config(*NATIVE_OVERRIDES, *overrides)
    for field in [*fields, "model.vision.native_resolution=true"]:
        assert field in str(error.value), str(error.value)


def test_the_dali_decoder_refuses_native_resolution():
    with pytest.raises(ValueError, match="data.images.decoder=pil"):
        build_image_decoder("dali", image_size=56, mean=MEAN, std=STD, native=NATIVE)


def test_synthetic_shapes_keep_their_proportions_at_any_aspect_ratio():
    for shape in ("circle", "square", "triangle"):
        spec = ShapeSpec(colour="red", shape=shape, cell=4)  # the centre cell
        for size in [(56, 224), (224, 56), (70, 70)]:
            rows, cols = np.nonzero(shape_mask(spec, size))
            assert abs(np.ptp(rows) - np.ptp(cols)) <= 1, (shape, size)
            assert size[0] / 3 <= rows.min() and rows.max() < 2 * size[0] / 3
            assert size[1] / 3 <= cols.min() and cols.max() < 2 * size[1] / 3
    image = draw_scene(Scene("gray", (ShapeSpec("red", "circle", 4),)), (28, 112))
    assert image.shape == (3, 28, 112)
