"""Tiles cut from image files in the shard pipeline (``data.tiling`` with webdataset).

Independent references: a lossless PNG of exactly the static canvas (2T x 2T) must come
back as its four quadrants, pixel for pixel, then its overview; tile counts equal the
plans of the images' sizes as Pillow reports them after EXIF orientation; the loader's
batches hold one placeholder run per tile; a cut interleaved document never keeps part of
an image's tiles; images too small to tile are skipped and counted.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm1_megatron.config.schema import TilingConfig
from mm1_megatron.data.pipeline.images import image_size_of
from mm1_megatron.data.pipeline.tiling import plan_tiles
from mm1_megatron.data.shards.ingest import llava_conversation_items
from mm1_megatron.data.shards.writer import ImageFile, build_shards
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

REPO = Path(__file__).resolve().parents[2]
TOK = SyntheticTokenizer()
TILE = 28  # debug.yaml: patch 14, 4 connector tokens per tile


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _noise(rng, height, width) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _conversation_shards(tmp_path: Path, images: dict) -> Path:
    """One single-turn conversation per image (``name -> bytes``), in order."""
    folder = tmp_path / "images"
    folder.mkdir()
    entries = []
    for name, data in images.items():
        (folder / name).write_bytes(data)
        turns = [
            {"from": "human", "value": "<image>\nhow many shapes ?"},
            {"from": "gpt", "value": "two ."},
        ]
        entries.append({"id": name, "image": name, "conversations": turns})
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    out = tmp_path / "shards"
    build_shards(
        llava_conversation_items(tmp_path / "llava.json", folder),
        out,
        kind="conversation",
        samples_per_shard=8,
        input_id="tiles",
        progress=False,
    )
    return out


def _loader(shards: Path, kind: str, *overrides):
    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.data.build import build_run_data

    cfg = validate_config(
        load_config(
            REPO / "configs/debug.yaml",
            [
                "data.source=webdataset",
                f"data.mixture={{{kind}: 1.0}}",
                f"data.shards.{kind}=[{shards}]",
                f"data.tiling.tile_size={TILE}",
                "training.micro_batch_size=1",
                "data.max_images_per_sequence=20",
                "data.conversations.packing=one_per_sequence",
                *overrides,
            ],
        )
    )
    loader, _ = build_run_data(cfg)
    return iter(loader), cfg


def _normalise(pixels: np.ndarray, vision) -> torch.Tensor:
    chw = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(vision.image_mean).view(3, 1, 1)
    return (chw - mean) / torch.tensor(vision.image_std).view(3, 1, 1)


def test_static_split_of_an_exact_canvas_is_its_quadrants_then_the_overview(tmp_path):
    pixels = _noise(np.random.default_rng(0), 2 * TILE, 2 * TILE)
    shards = _conversation_shards(tmp_path, {"exact.png": _png(pixels)})
    batches, cfg = _loader(shards, "conversation", "data.tiling.mode=static")
    batch, vision = next(batches), cfg.model.vision
    assert int(batch["num_images"][0]) == 5
    images = batch["images"][:5].float()
    quadrants = [
        pixels[r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE] for r in (0, 1) for c in (0, 1)
    ]
    for tile, quadrant in zip(images[:4], quadrants):
        torch.testing.assert_close(tile, _normalise(quadrant, vision), rtol=0, atol=1e-5)
    overview = np.array(Image.fromarray(pixels).resize((TILE, TILE), Image.BILINEAR))
    # The overview is resized with torch's antialiased bilinear filter, not Pillow's:
    # close to Pillow's result, not equal.
    assert (images[4] - _normalise(overview, vision)).abs().mean() < 0.05
    tokens = batch["tokens"][0]
    assert int((tokens == TOK.image_token_id).sum()) == 5 * 4  # 5 tiles x 4 tokens


def _exif_rotated_jpeg(rng, width: int, height: int) -> bytes:
    """A JPEG stored ``width x height`` whose EXIF says to display it rotated by 90°."""
    image = Image.fromarray(_noise(rng, height, width))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_dynamic_tile_counts_follow_the_displayed_image_sizes(tmp_path):
    rng = np.random.default_rng(1)
    images = {
        "wide.png": _png(_noise(rng, 30, 150)),
        "tall.png": _png(_noise(rng, 140, 40)),
        "rotated.jpg": _exif_rotated_jpeg(rng, 150, 30),  # displayed 30 wide, 150 tall
        "square.png": _png(_noise(rng, 70, 70)),
    }
    for name, data in images.items():
        with Image.open(io.BytesIO(data)) as opened:
            from PIL import ImageOps

            assert image_size_of(data) == ImageOps.exif_transpose(opened).size, name
    assert image_size_of(images["rotated.jpg"]) == (30, 150)
    shards = _conversation_shards(tmp_path, images)
    settings = TilingConfig(mode="dynamic", tile_size=TILE, min_tiles=2, max_tiles=6)
    expected = {
        name: plan_tiles([image_size_of(data)], settings)[0].num_tiles
        for name, data in images.items()
    }
    assert len(set(expected.values())) > 1  # the grids differ
    batches, _ = _loader(
        shards,
        "conversation",
        "data.tiling.mode=dynamic",
        "data.tiling.min_tiles=2",
        "data.tiling.max_tiles=6",
    )
    seen = []
    for _ in range(8):
        batch = next(batches)
        count = int(batch["num_images"][0])
        assert int((batch["tokens"][0] == TOK.image_token_id).sum()) == 4 * count
        seen.append(count)
    assert sorted(set(seen)) == sorted(set(expected.values()))


def test_images_too_small_to_tile_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(2)
    images = {"tiny.png": _png(_noise(rng, 8, 40)), "fine.png": _png(_noise(rng, 40, 40))}
    shards = _conversation_shards(tmp_path, images)
    batches, _ = _loader(
        shards,
        "conversation",
        "data.tiling.mode=static",
    )
    loader = batches
    for _ in range(4):
        batch = next(loader)
        assert int(batch["num_images"][0]) == 5  # only the fine image ever arrives
    assert loader.skip_counts()["too_small"] >= 1


@pytest.mark.parametrize("separator", [None, "next"])
def test_a_cut_interleaved_document_keeps_whole_images_only(tmp_path, separator):
    rng = np.random.default_rng(3)
    paths = []
    for number in range(2):
        path = tmp_path / f"{number}.png"
        path.write_bytes(_png(_noise(rng, 56, 56)))
        paths.append(ImageFile(path))
    document = ["here is a picture :", paths[0], "here is a picture :", paths[1], "."]
    build_shards([document], tmp_path / "docs", kind="interleaved", samples_per_shard=4,
                 input_id="cut", progress=False)  # fmt: skip
    # 5 tiles per image; 7 fit: the second image would be cut inside its tiles.
    extra = [] if separator is None else [f"data.tiling.separator={separator}"]
    batches, _ = _loader(tmp_path / "docs", "interleaved", "data.tiling.mode=static",
                         "data.max_images_per_sequence=7", *extra)  # fmt: skip
    batch = next(batches)
    tokens = batch["tokens"][0]
    assert int(batch["num_images"][0]) == 5
    assert int((tokens == TOK.image_token_id).sum()) == 20
    if separator is not None:  # 4 between the 5 tiles of the first image, none after
        assert int((tokens == TOK.encode(separator)[0]).sum()) == 4


def test_tiling_webdataset_runs_need_the_pil_decoder():
    from mm1_megatron.config import load_config, validate_config

    overrides = ["data.source=webdataset", "data.shards.caption=[x]", "data.mixture={caption: 1}"]
    with pytest.raises(ValueError, match="data.images.decoder=pil"):
        validate_config(
            load_config(
                REPO / "configs/debug.yaml",
                [*overrides, "data.tiling.mode=static", "data.images.decoder=dali"],
            )
        )
    validate_config(
        load_config(REPO / "configs/debug.yaml", [*overrides, "data.tiling.mode=static"])
    )
