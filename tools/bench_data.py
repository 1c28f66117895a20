#!/usr/bin/env python
"""Data pipeline figures, in one run on CPU:

1. ``decode``: images/s of the DALI and the PIL decoder on the same JPEG files (decode,
   resize, normalise, CHW float32), one thread each, batches of one sequence's worth of
   images, timings interleaved so machine noise hits both alike;
2. ``packing``: packing efficiency (real tokens / token slots) of caption pairs packed by
   the loader against one pair per sequence, on caption lengths distributed like COCO's;
3. ``loaders`` (not in the default run): images/s of three loaders on the same caption
   shards of JPEGs, each doing the same work per image (decode, centre-crop and resize to
   ``--image-size``, normalise to CHW float32) and delivering batches of one sequence's
   worth (``--window``) of images, with 0 and 2 loader workers: ours
   (``data.build.build_data``, webdataset source, PIL decoder; it also tokenizes and
   packs), Megatron-Energon's loader (``get_train_dataset`` / ``get_loader``, its PIL
   decoder, a task encoder that crops and normalises as ours does) and plain
   ``webdataset.WebDataset`` + PIL + ``torch.utils.data.DataLoader``. Each measurement
   builds a fresh loader, takes warm-up batches (worker start-up included there, reported
   apart as ``startup_s``), then times ``--batches`` batches; the loaders alternate,
   in a rotated order, for ``--rounds`` rounds. Ratios: ours / baseline of the medians,
   and the range of the per-round ratios.

Every part computes with one torch thread in this process (``--torch-threads``), as each
loader worker does: on a shared machine several threads spin against the other jobs, and
the figures measured that instead of the decoders and loaders.

    python tools/bench_data.py                      # decode + packing, MM1 settings
    python tools/bench_data.py --images my_jpegs/   # your files instead of generated ones
    python tools/bench_data.py --parts loaders --rounds 5   # loader comparison, 378 px
    python tools/bench_data.py --tiny               # every part in seconds (a smoke test)

The last line printed is one JSON object of all the figures.

Generated images are 640x480 JPEGs (COCO's most common size) of smooth shapes plus noise.
COCO-like captions: lengths in tokens drawn from a normal with mean 13.5 and standard
deviation 3.5, clipped to [6, 50] (COCO captions average 10.5 words; a 32k subword
vocabulary gives about 1.3 tokens per word).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch

from mm1_megatron.config.schema import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, DataConfig, ShardsConfig
from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline.images import build_image_decoder, dali_installed
from mm1_megatron.data.shards.energon_meta import write_energon_meta
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
        for name in (("dali", "pil") if dali_installed() else ("pil",))
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


# ---- 3. loaders ----------------------------------------------------------------------------

LOADER_NAMES = ("ours", "energon", "webdataset")
PREFETCH_FACTOR = 2  # batches each worker builds ahead, the same for every loader
LOADER_CAPTION_WORDS = 8  # + bos and eos: 10 tokens per caption


@dataclass
class LoaderSetup:
    """What every loader reads (caption shards of JPEGs) and delivers per batch."""

    manifest: Path  # manifest.json; energon's .nv-meta lies beside it
    image_size: int
    window: int  # images per batch: one packed sequence's worth
    seq_length: int
    num_image_tokens: int

    @property
    def folder(self) -> Path:
        return self.manifest.parent

    @property
    def shards(self) -> List[str]:
        return sorted(str(path) for path in self.folder.glob("*.tar"))


def write_loader_shards(folder: Path, blobs: List[bytes], samples: int, shards: int) -> Path:
    """``samples`` caption pairs (the JPEGs in turn, short captions) in ``shards`` tars,
    with our manifest and energon's ``.nv-meta``; returns the manifest."""
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    caption = " ".join(["red"] * LOADER_CAPTION_WORDS)
    entries = []
    for shard in range(shards):
        numbers = range(shard, samples, shards)
        with tarfile.open(folder / f"part-{shard:02d}.tar", "w") as archive:
            for number in numbers:
                members = record_members([(blobs[number % len(blobs)], "jpg"), caption])
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{number:08d}.{extension}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        entries.append({"path": f"part-{shard:02d}.tar", "num_samples": len(numbers)})
    manifest = write_manifest(folder / "manifest.json", "caption", entries)
    write_energon_meta(manifest)
    return manifest


class CropNormalise:
    """An RGB Pillow image -> normalised float32 ``[3, S, S]``: the centred square resized
    to ``S x S`` with Pillow's bilinear filter, then ``(x / 255 - mean) / std``, as our
    PIL decoder's ``crop`` mode does (``pipeline/images.py``)."""

    def __init__(self, image_size: int):
        self.size = image_size
        self.mean = torch.tensor(CLIP_IMAGE_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_IMAGE_STD).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        from PIL import Image

        width, height = image.size
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        pixels = np.array(image.resize((self.size, self.size), Image.BILINEAR, box=box))
        return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 - self.mean) / self.std


def ours_loader(setup: LoaderSetup, workers: int):
    """``build_data`` on the caption shards: one sequence of ``window`` pairs per batch."""
    cfg = DataConfig(
        source="webdataset",
        shards=ShardsConfig(caption=[str(setup.manifest)]),
        mixture={"caption": 1.0},
        max_images_per_sequence=setup.window,
        caption_window=setup.window,
        num_workers=workers,
        prefetch_factor=PREFETCH_FACTOR,
    )
    loader, _ = build_data(
        cfg,
        seq_length=setup.seq_length,
        micro_batch_size=1,
        num_image_tokens=setup.num_image_tokens,
        image_size=setup.image_size,
        image_mean=CLIP_IMAGE_MEAN,
        image_std=CLIP_IMAGE_STD,
        seed=0,
        dp_rank=0,
        dp_size=1,
    )
    return loader, _ours_images


def _ours_images(batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    images = batch["images"]
    assert int(batch["num_images"].sum()) == images.shape[0], "images and counts disagree"
    return images


def energon_loader(setup: LoaderSetup, workers: int):
    """Megatron-Energon's loader on the same folder (the ``.nv-meta`` of
    ``write_energon_meta``: ``CaptioningSample``s), its PIL decoder, batches of ``window``."""
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    dataset = get_train_dataset(
        str(setup.folder),
        worker_config=WorkerConfig(rank=0, world_size=1, num_workers=workers),
        batch_size=setup.window,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        task_encoder=_energon_task_encoder(CropNormalise(setup.image_size)),
    )
    return get_loader(dataset, prefetch_factor=PREFETCH_FACTOR), _as_is


def _energon_task_encoder(transform: CropNormalise):
    from megatron.energon import SampleDecoder, TaskEncoder, stateless

    class CropTaskEncoder(TaskEncoder):
        decoder = SampleDecoder(image_decode="pil")  # Pillow: open, load, convert("RGB")

        @stateless
        def encode_sample(self, sample) -> torch.Tensor:
            return transform(sample.image)

        @stateless
        def batch(self, samples: List[torch.Tensor]) -> torch.Tensor:
            return torch.stack(samples)

    return CropTaskEncoder()


def webdataset_loader(setup: LoaderSetup, workers: int):
    """``webdataset.WebDataset`` (shards drawn with replacement, endless), its PIL
    decoding, then ``torch.utils.data.DataLoader`` batches of ``window``."""
    import webdataset

    dataset = (
        webdataset.WebDataset(setup.shards, resampled=True, shardshuffle=False)
        .decode("pil")  # Pillow: open, load, convert("RGB")
        .map(partial(_webdataset_image, CropNormalise(setup.image_size)))
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=setup.window,
        num_workers=workers,
        prefetch_factor=PREFETCH_FACTOR if workers else None,
    )
    return loader, _as_is


def _webdataset_image(transform: CropNormalise, sample: dict) -> torch.Tensor:
    return transform(sample["0.jpg"])


def _as_is(batch: torch.Tensor) -> torch.Tensor:
    return batch


LOADERS: Dict[str, Callable] = {
    "ours": ours_loader,
    "energon": energon_loader,
    "webdataset": webdataset_loader,
}


def measure_loader(setup: LoaderSetup, name: str, workers: int, batches: int) -> dict:
    """A fresh loader: start-up (building it, starting its workers and ``2 + 2 workers``
    warm-up batches, so every worker has delivered twice), then ``batches`` timed ones."""
    began = time.perf_counter()
    loader, images_of = LOADERS[name](setup, workers)
    iterator = iter(loader)
    for _ in range(2 + 2 * workers):
        images_of(next(iterator))
    ready = time.perf_counter()
    images = 0
    for _ in range(batches):
        chunk = images_of(next(iterator))
        images += chunk.shape[0]
    seconds = time.perf_counter() - ready
    del iterator, loader
    _stop_workers()
    return {
        "images": images,
        "batches": batches,
        "seconds": seconds,
        "startup_s": ready - began,
        "image": [*chunk.shape[1:], str(chunk.dtype).replace("torch.", "")],
    }


def _stop_workers(timeout: float = 30.0) -> None:
    """Collect the finished loader, whose worker processes then exit; wait for them."""
    gc.collect()
    for child in multiprocessing.active_children():
        child.join(timeout)
        if child.is_alive():
            logger.warning("loader worker %s still running after %.0f s", child.pid, timeout)


def compare_loaders(
    setup: LoaderSetup, workers: Sequence[int], rounds: int, batches: int
) -> Dict[int, Dict[str, List[dict]]]:
    """Measurements per worker count and loader; each round rotates the loaders' order."""
    results: Dict[int, Dict[str, List[dict]]] = {}
    for count in workers:
        results[count] = {name: [] for name in LOADER_NAMES}
        for round_number in range(rounds):
            shift = round_number % len(LOADER_NAMES)
            for name in LOADER_NAMES[shift:] + LOADER_NAMES[:shift]:
                result = measure_loader(setup, name, count, batches)
                results[count][name].append(result)
                logger.info("%d workers, %s: %s", count, name, result)
    return results


def spread(values: Sequence[float]) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise_loaders(measurements: Dict[str, List[dict]]) -> dict:
    """Figures per loader and ratios ours / baseline for one worker count."""
    rates = {
        name: [m["images"] / m["seconds"] for m in runs] for name, runs in measurements.items()
    }
    loaders = {
        name: {
            "images_per_s": spread(rates[name]),
            "images_per_s_by_round": rates[name],
            "sequences_per_s": spread([m["batches"] / m["seconds"] for m in runs]),
            "startup_s": spread([m["startup_s"] for m in runs]),
            "images_per_measurement": [m["images"] for m in runs],
            "image": runs[0]["image"],
        }
        for name, runs in measurements.items()
    }
    ratios = {}
    for baseline in LOADER_NAMES[1:]:
        per_round = [ours / base for ours, base in zip(rates["ours"], rates[baseline])]
        ratios[f"ours/{baseline}"] = {
            "of_medians": statistics.median(rates["ours"]) / statistics.median(rates[baseline]),
            "per_round": spread(per_round),
        }
    return {"loaders": loaders, "ratios": ratios}


def print_loader_table(summary: Dict[str, dict]) -> None:
    print(
        f"  {'workers':>7s}  {'loader':10s}  {'images/s median':>15s}  {'min':>7s}  "
        f"{'max':>7s}  {'N':>2s}  {'seq/s':>6s}  {'start-up s':>10s}"
    )
    for workers, figures in summary.items():
        for name, loader in figures["loaders"].items():
            rate, startup = loader["images_per_s"], loader["startup_s"]
            print(
                f"  {workers:>7}  {name:10s}  {rate['median']:15.1f}  {rate['min']:7.1f}  "
                f"{rate['max']:7.1f}  {rate['n']:2d}  "
                f"{loader['sequences_per_s']['median']:6.2f}  {startup['median']:10.2f}"
            )
        for label, ratio in figures["ratios"].items():
            rounds = ratio["per_round"]
            print(
                f"  {workers:>7}  {label:18s} {ratio['of_medians']:.2f}x of the medians; "
                f"per round median {rounds['median']:.2f}x, {rounds['min']:.2f}-"
                f"{rounds['max']:.2f}"
            )


def run_loaders(args: argparse.Namespace, blobs: List[bytes], tmp: Path) -> dict:
    setup = LoaderSetup(
        manifest=write_loader_shards(tmp / "loaders", blobs, args.shard_samples, args.shards),
        image_size=args.image_size,
        window=args.window,
        seq_length=args.seq_length,
        num_image_tokens=args.image_tokens,
    )
    workers = [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()
    print(
        f"loader comparison ({args.shard_samples} caption pairs of {len(blobs)} JPEGs in "
        f"{args.shards} shards, {args.image_size} px crop, float32; batches of "
        f"{args.window} images, {args.batches} timed per measurement after warm-up; "
        f"start-up incl. warm-up reported apart; {args.torch_threads} torch thread(s) in "
        f"this process; load average before "
        f"{' '.join(f'{x:.2f}' for x in load_before)})"
    )
    results = compare_loaders(setup, workers, args.rounds, args.batches)
    summary = {w: summarise_loaders(m) for w, m in results.items()}
    load_after = os.getloadavg()
    print_loader_table(summary)
    print(f"  load average after {' '.join(f'{x:.2f}' for x in load_after)}")
    return {
        "settings": {
            "image_size": args.image_size,
            "images_per_batch": args.window,
            "timed_batches": args.batches,
            "warmup_batches": "2 + 2 * workers",
            "prefetch_factor": PREFETCH_FACTOR,
            "shard_samples": args.shard_samples,
            "shards": args.shards,
            "distinct_jpegs": len(blobs),
            "rounds": args.rounds,
        },
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "workers": {str(w): figures for w, figures in summary.items()},
    }


def versions() -> Dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "megatron-core", "megatron-energon", "webdataset", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# ---- command line ---------------------------------------------------------------------------

PARTS = ("decode", "packing", "loaders")
TINY = dict(  # every part in seconds: a smoke test of the script, not a measurement
    parts="decode,packing,loaders",
    num_images=8,
    image_size=32,
    batch=4,
    rounds=2,
    num_sequences=10,
    num_captions=2000,
    window=8,
    seq_length=256,
    image_tokens=4,
    batches=2,
    shard_samples=64,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="decode,packing", help=f"of {','.join(PARTS)}")
    parser.add_argument("--tiny", action="store_true", help="all parts, tiny sizes (seconds)")
    parser.add_argument("--images", help="folder of JPEGs (default: generate --num-images)")
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=378)
    parser.add_argument("--batch", type=int, default=16, help="images per decode call")
    parser.add_argument("--rounds", type=int, default=3, help="decode and loader rounds")
    parser.add_argument("--num-sequences", type=int, default=200)
    parser.add_argument("--num-captions", type=int, default=20000, help="packing's captions")
    parser.add_argument("--torch-threads", type=int, default=1, help="in this process")
    loaders = parser.add_argument_group("loaders")
    loaders.add_argument("--workers", default="0,2", help="loader worker counts to measure")
    loaders.add_argument("--window", type=int, default=16, help="images per batch (sequence)")
    loaders.add_argument("--seq-length", type=int, default=4096, help="ours: tokens per sequence")
    loaders.add_argument("--image-tokens", type=int, default=144, help="ours: tokens per image")
    loaders.add_argument("--batches", type=int, default=16, help="timed batches per measurement")
    loaders.add_argument("--shard-samples", type=int, default=512, help="caption pairs written")
    loaders.add_argument("--shards", type=int, default=4, help="shards they are written to")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        parser.error(f"--parts {args.parts}: {sorted(unknown)} not among {PARTS}")
    return args


def run_decode(args: argparse.Namespace, blobs: List[bytes]) -> dict:
    rates = bench_decoders(blobs, args.image_size, args.batch, args.rounds)
    print(
        f"image decoding ({len(blobs)} JPEGs, {args.image_size} px crop, batches of "
        f"{args.batch}, 1 thread each)"
    )
    for name, rate in rates.items():
        print(f"  {name:5s} {rate:8.1f} images/s")
    if "dali" in rates:
        print(f"  ratio dali/pil {rates['dali'] / rates['pil']:.2f}")
    else:
        print("  (DALI is not installed: PIL only)")
    return {"image_size": args.image_size, "images_per_s": rates}


def run_packing(args: argparse.Namespace, tmp: Path) -> dict:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    lengths = coco_like_lengths(args.num_captions)
    print(f"caption packing (COCO-like captions: mean {lengths.mean():.1f} tokens incl. bos/eos)")
    manifest = write_caption_shard(tmp / "packing", lengths, buffer.getvalue())
    results = {}
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
        results[label] = result
    return results


def load_blobs(args: argparse.Namespace) -> List[bytes]:
    if args.images:
        return [p.read_bytes() for p in sorted(Path(args.images).glob("*.jp*g"))]
    return generated_jpegs(args.num_images)


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(logging.WARNING)
    # Loader workers compute with one torch thread each (DataLoader sets it); so do the
    # decoders and the loaders at 0 workers here: several threads spin against other jobs
    # on a shared machine (normalising took 30x longer on a busy 2-core box).
    torch.set_num_threads(args.torch_threads)
    # Energon's loader asks for pinned memory, which a machine without a GPU cannot give.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    parts = args.parts.split(",")
    summary: dict = {
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
    }
    blobs = load_blobs(args) if {"decode", "loaders"} & set(parts) else []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if "decode" in parts:
            summary["decode"] = run_decode(args, blobs)
        if "packing" in parts:
            summary["packing"] = run_packing(args, tmp)
        if "loaders" in parts:
            summary["loaders"] = run_loaders(args, blobs, tmp)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
