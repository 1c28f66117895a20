#!/usr/bin/env python
"""Data pipeline figures, in one run on CPU:

1. images/s of the DALI and the PIL decoder on the same JPEG files (decode, resize,
   normalise, CHW float32), one thread each, batches of one sequence's worth of images,
   timings interleaved so machine noise hits both alike;
2. packing efficiency (real tokens / token slots) of caption pairs packed by the loader
   against one pair per sequence, on caption lengths distributed like COCO's.

    python tools/bench_data.py                      # MM1 settings: 378 px, 4096 tokens
    python tools/bench_data.py --images my_jpegs/   # your files instead of generated ones

Generated images are 640x480 JPEGs (COCO's most common size) of smooth shapes plus noise.
COCO-like captions: lengths in tokens drawn from a normal with mean 13.5 and standard
deviation 3.5, clipped to [6, 50] (COCO captions average 10.5 words; a 32k subword
vocabulary gives about 1.3 tokens per word).
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import List

import numpy as np

from mm1_megatron.config.schema import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, DataConfig, ShardsConfig
from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline.images import build_image_decoder
from mm1_megatron.data.shards.reader import write_manifest
from mm1_megatron.data.shards.records import record_members
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("bench_data")


def generated_jpegs(count: int, seed: int = 0) -> List[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    blobs = []
    for _ in range(count):
        base = np.stack(
            [
                np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80))
                for c in range(3)
            ],
            axis=-1,
        )
        pixels = ((base + 1) * 100 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def bench_decoders(blobs: List[bytes], image_size: int, batch: int, rounds: int) -> dict:
    decoders = {
        name: build_image_decoder(
            name,
            image_size=image_size,
            mean=CLIP_IMAGE_MEAN,
            std=CLIP_IMAGE_STD,
            resize_mode="crop",
        )
        for name in ("dali", "pil")
    }
    for decoder in decoders.values():  # warm-up: DALI builds its pipeline here
        decoder.decode(blobs[:batch])
    seconds = {name: [] for name in decoders}
    for _ in range(rounds):
        for start in range(0, len(blobs) - batch + 1, batch):
            chunk = blobs[start : start + batch]
            for name, decoder in decoders.items():
                began = time.perf_counter()
                decoder.decode(chunk)
                seconds[name].append(time.perf_counter() - began)
    return {name: batch / statistics.median(times) for name, times in seconds.items()}


def coco_like_lengths(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(13.5, 3.5, count)), 6, 50).astype(int)


def write_caption_shard(folder: Path, lengths: np.ndarray, image: bytes) -> Path:
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / "pairs.tar", "w") as archive:
        for number, length in enumerate(lengths):
            caption = " ".join(["red"] * int(length - 2))  # bos and eos make up the rest
            for extension, data in record_members([(image, "png"), caption]).items():
                info = tarfile.TarInfo(f"{number:08d}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return write_manifest(
        folder / "manifest.json", "caption", [{"path": "pairs.tar", "num_samples": len(lengths)}]
    )


def packing_efficiency(
    manifest: Path,
    lengths: np.ndarray,
    *,
    seq_length: int,
    num_image_tokens: int,
    max_images: int,
    num_sequences: int,
) -> dict:
    cfg = DataConfig(
        source="webdataset",
        shards=ShardsConfig(caption=[str(manifest)]),
        mixture={"caption": 1.0},
        max_images_per_sequence=max_images,
        caption_window=max_images,
    )
    loader, _ = build_data(
        cfg,
        seq_length=seq_length,
        micro_batch_size=1,
        num_image_tokens=num_image_tokens,
        image_size=14,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        seed=0,
        dp_rank=0,
        dp_size=1,
    )
    real = sum(int(next(loader)["num_real_tokens"]) for _ in range(num_sequences))
    pair_tokens = lengths + num_image_tokens
    return {
        "packed": real / (num_sequences * seq_length),
        "one_per_sequence": float(pair_tokens.mean()) / seq_length,
        "unused_pairs": loader.stats()["unused_samples"],
        "mean_pair_tokens": float(pair_tokens.mean()),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", help="folder of JPEGs (default: generate --num-images)")
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=378)
    parser.add_argument("--batch", type=int, default=16, help="images per decode call")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-sequences", type=int, default=200)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.WARNING)
    if args.images:
        blobs = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jp*g"))]
    else:
        blobs = generated_jpegs(args.num_images)
    rates = bench_decoders(blobs, args.image_size, args.batch, args.rounds)
    print(
        f"image decoding ({len(blobs)} JPEGs, {args.image_size} px crop, batches of "
        f"{args.batch}, 1 thread each)"
    )
    for name, rate in rates.items():
        print(f"  {name:5s} {rate:8.1f} images/s")
    print(f"  ratio dali/pil {rates['dali'] / rates['pil']:.2f}")
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    lengths = coco_like_lengths(20000)
    print(f"caption packing (COCO-like captions: mean {lengths.mean():.1f} tokens incl. bos/eos)")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_caption_shard(Path(tmp), lengths, buffer.getvalue())
        for label, seq, tokens, cap in (
            ("MM1: 4096 tokens, 16 x 144", 4096, 144, 16),
            ("debug: 256 tokens, 8 x 4", 256, 4, 8),
        ):
            result = packing_efficiency(
                manifest,
                lengths,
                seq_length=seq,
                num_image_tokens=tokens,
                max_images=cap,
                num_sequences=args.num_sequences,
            )
            print(
                f"  {label:28s} packed {result['packed']:6.1%}   one pair per sequence "
                f"{result['one_per_sequence']:6.1%}   gain x"
                f"{result['packed'] / result['one_per_sequence']:.1f}   unused pairs "
                f"{result['unused_pairs']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
