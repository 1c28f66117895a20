#!/usr/bin/env python
"""What checkpoint content checksums cost: hashing on save, verifying on load.

Two checkpoints, single process, in a temporary folder under /tmp (removed at the end):

- debug: the real checkpoint of ``configs/debug.yaml`` (model + distributed-optimizer
  state, trainer state, config, RNG), from an in-process ``Trainer`` after one step,
  written the way ``CheckpointManager.save`` writes it (blocking);
- plain: ``--size-gib`` of fp32 tensors (64 MiB each, random) in one sharded state dict,
  written with ``dist_checkpointing.save`` (torch_dist) into the same folder layout.

Each repetition writes a fresh folder and measures, side by side:

- save: the write without checksums (everything ``CheckpointManager.save`` does before
  hashing: sharded state dict, ``dist_checkpointing.save`` with its fsync, small files)
  vs the hashing it adds (``write_rank_digests`` + ``write_manifest``);
- load: sharded state dict + ``dist_checkpointing.load`` vs ``verify_manifest``, their
  order alternating between repetitions, both warm (the files are in the page cache after
  the write);
- cold (unless ``--no-cold``): the same load and verify, each after ``fsync`` and
  ``POSIX_FADV_DONTNEED`` on every file of the folder, which approximates a cold read
  (the host of a virtual machine may still cache the disk);
- a reference: SHA-256 of 64 MiB already in memory, the hash alone without I/O.

Figures are median, min and max over the repetitions after ``--warmup`` untimed ones;
overheads are per-repetition ratios (hashing / write, verify / load), so drift hits both.

    python tools/bench_checksums.py                  # about 2 minutes on 2 cores
    python tools/bench_checksums.py --repeats 3 --size-gib 0.25 --json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench_checksums")

TENSOR_MIB = 64
REFERENCE = os.urandom(64 << 20)  # hashed in memory each repetition: SHA-256 without I/O


@dataclass
class Case:
    """A checkpoint to measure: ``write(folder)`` writes it without a manifest,
    ``load(folder)`` reads it back with ``dist_checkpointing.load``."""

    name: str
    description: str
    write: Callable[[Path], None]
    load: Callable[[Path], None]
    repeats: int
    close: Callable[[], None] = lambda: None


@dataclass
class Samples:
    num_bytes: int = 0
    num_files: int = 0
    seconds: Dict[str, List[float]] = field(default_factory=dict)

    def add(self, what: str, value: float) -> None:
        self.seconds.setdefault(what, []).append(value)


def timed(fn: Callable[[Path], object], folder: Path) -> float:
    start = time.perf_counter()
    fn(folder)
    return time.perf_counter() - start


def files_of(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def drop_page_cache(folder: Path) -> None:
    """Flush every file of ``folder`` and ask the kernel to drop its cached pages."""
    for path in files_of(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hash_in_memory(_: Path) -> None:
    import hashlib

    digest, view, chunk = hashlib.sha256(), memoryview(REFERENCE), 16 << 20
    for start in range(0, len(view), chunk):  # the chunk size manifest.file_digest reads
        digest.update(view[start : start + chunk])


def hash_checkpoint(folder: Path) -> None:
    """What checksums add to a single-process save: this rank's digests, then the
    manifest (rank 0 merges them and hashes the files no rank claimed)."""
    from mm1_megatron.checkpoint.manifest import write_manifest, write_rank_digests

    write_rank_digests(folder, 0)
    write_manifest(folder)


def measure(case: Case, workdir: Path, *, warmup: int, cold: bool) -> Samples:
    from mm1_megatron.checkpoint.manifest import MANIFEST_FILE, verify_manifest

    samples = Samples()
    for rep in range(warmup + case.repeats):
        folder = workdir / f"{case.name}-{rep}"
        record = rep >= warmup
        results = {
            "write": timed(case.write, folder),
            "hash": timed(hash_checkpoint, folder),
            "sha256 in memory": timed(hash_in_memory, folder),
        }
        if rep == 0:
            checked = [p for p in files_of(folder) if p.name != MANIFEST_FILE]
            samples.num_bytes = sum(p.stat().st_size for p in checked)
            samples.num_files = len(checked)
        steps = {"load": case.load, "verify": verify_manifest}
        order = ["load", "verify"] if rep % 2 == 0 else ["verify", "load"]
        for what in order:
            results[what] = timed(steps[what], folder)
        if cold:
            for what in order:
                drop_page_cache(folder)
                results[f"cold {what}"] = timed(steps[what], folder)
        shutil.rmtree(folder)
        logger.info(
            "%s repeat %d%s: %s",
            case.name,
            rep + 1,
            " (warm-up)" if not record else "",
            ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in results.items()),
        )
        if record:
            for what, seconds in results.items():
                samples.add(what, seconds)
    return samples


# ---- the checkpoints -------------------------------------------------------------------
def debug_case(workdir: Path, config: str, repeats: int) -> Case:
    """The debug config's checkpoint after one training step of an in-process Trainer."""
    from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR
    from mm1_megatron.checkpoint.manager import TrainingState, load_sharded
    from mm1_megatron.checkpoint.rng import save_rng_state
    from mm1_megatron.compat.checkpointing import save_sharded
    from mm1_megatron.config import load_config
    from mm1_megatron.training.trainer import Trainer

    cfg = load_config(
        config,
        [
            f"logging.output_dir={workdir / 'run'}",
            "logging.tensorboard=false",
            "training.train_steps=1",
            f"checkpoint.save_dir={workdir / 'saves'}",
        ],
    )
    trainer = Trainer(cfg)
    trainer.train_step()
    manager = trainer.checkpoints
    state = TrainingState(
        trainer.model_chunks,
        trainer.optimizer,
        trainer.scheduler,
        trainer.data,
        trainer.step,
        trainer.consumed_sequences,
        trainer.cfg,
    )

    def write(folder: Path) -> None:  # CheckpointManager.save up to the digests
        (folder / MODEL_OPTIM_DIR).mkdir(parents=True)
        manager._write_trainer_files(state, folder)
        save_rng_state(folder / "rng" / "rank_00000.pt")
        sharded = manager._sharded_state_dict(state, is_loading=False)
        save_sharded(sharded, str(folder / MODEL_OPTIM_DIR), async_save=False)

    def load(folder: Path) -> None:
        load_sharded(manager._sharded_state_dict(state, is_loading=True), folder)

    def close() -> None:
        manager.close()
        trainer.data.close()

    description = f"{config} after 1 step (model + distributed optimizer)"
    return Case("debug", description, write, load, repeats, close)


def plain_case(size_gib: float, repeats: int) -> Case:
    """``size_gib`` of random fp32 tensors, 64 MiB each, as one sharded state dict."""
    import torch
    from megatron.core.dist_checkpointing import ShardedTensor

    from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR
    from mm1_megatron.checkpoint.manager import load_sharded
    from mm1_megatron.compat.checkpointing import save_sharded

    num_tensors = max(1, round(size_gib * 1024 / TENSOR_MIB))
    numel = (TENSOR_MIB << 20) // 4
    generator = torch.Generator().manual_seed(0)
    names = [f"layers.{i:03d}.weight" for i in range(num_tensors)]
    tensors = {name: torch.randn(numel, generator=generator) for name in names}
    targets = {name: torch.empty(numel) for name in names}  # the load's destination
    checked = []

    def sharded(source: Dict[str, torch.Tensor]):
        return {n: ShardedTensor.from_rank_offsets(n, t, replica_id=0) for n, t in source.items()}

    def write(folder: Path) -> None:
        (folder / MODEL_OPTIM_DIR).mkdir(parents=True)
        save_sharded(sharded(tensors), str(folder / MODEL_OPTIM_DIR), async_save=False)

    def load(folder: Path) -> None:
        loaded = load_sharded(sharded(targets), folder)
        if not checked:  # once: the load really returns what was written
            assert all(torch.equal(loaded[n], tensors[n]) for n in names), "load differs"
            checked.append(True)

    size = num_tensors * TENSOR_MIB / 1024
    return Case(
        "plain",
        f"{num_tensors} fp32 tensors of {TENSOR_MIB} MiB ({size:g} GiB)",
        write,
        load,
        repeats,
    )


# ---- report ------------------------------------------------------------------------------
def summarise(samples: Samples) -> Dict[str, Dict[str, float]]:
    """median / min / max of every figure, times in ms, overheads in %, rates in GB/s."""
    s = samples.seconds

    def stats(values: List[float]) -> Dict[str, float]:
        return {
            "median": round(statistics.median(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
            "n": len(values),
        }

    rows: Dict[str, Dict[str, float]] = {}
    rows["save: write, no checksums (ms)"] = stats([v * 1e3 for v in s["write"]])
    rows["save: + hashing (ms)"] = stats([v * 1e3 for v in s["hash"]])
    rows["save overhead (%)"] = stats([100 * h / w for h, w in zip(s["hash"], s["write"])])
    rows["hash throughput (GB/s)"] = stats([samples.num_bytes / h / 1e9 for h in s["hash"]])
    rows["sha256 in memory, 64 MiB (GB/s)"] = stats(
        [len(REFERENCE) / t / 1e9 for t in s["sha256 in memory"]]
    )
    for prefix in ("", "cold "):
        if f"{prefix}load" not in s:
            continue
        load, verify = s[f"{prefix}load"], s[f"{prefix}verify"]
        rows[f"{prefix}load: dist_checkpointing.load (ms)"] = stats([v * 1e3 for v in load])
        rows[f"{prefix}load: + verify_manifest (ms)"] = stats([v * 1e3 for v in verify])
        rows[f"{prefix}load overhead (%)"] = stats([100 * v / ld for v, ld in zip(verify, load)])
        rows[f"{prefix}verify throughput (GB/s)"] = stats(
            [samples.num_bytes / v / 1e9 for v in verify]
        )
    return rows


def print_table(case: Case, samples: Samples, rows: Dict[str, Dict[str, float]]) -> None:
    print(
        f"\n{case.name}: {case.description}; {samples.num_bytes / 1e6:.1f} MB in "
        f"{samples.num_files} files; N={case.repeats}"
    )
    print(f"{'':42} {'median':>9} {'min':>9} {'max':>9}")
    for label, row in rows.items():
        digits = 2 if "GB/s" in label else 1
        print(
            f"{label:42} {row['median']:9.{digits}f} {row['min']:9.{digits}f} "
            f"{row['max']:9.{digits}f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--size-gib", type=float, default=1.0, help="size of the plain case")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats, plain case")
    parser.add_argument("--debug-repeats", type=int, default=10, help="timed repeats, debug")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repeats of each")
    parser.add_argument("--no-cold", action="store_true", help="skip the dropped-cache reads")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args()

    from mm1_megatron.utils.logging_setup import setup_logging

    setup_logging()
    for noisy in ("mm1_megatron", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    from mm1_megatron.parallel import shutdown_distributed

    load_before = os.getloadavg()
    started = time.perf_counter()
    summary = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "torch_threads": torch.get_num_threads(),
        "cold_reads": not args.no_cold,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench_checksums-", dir="/tmp"))
    try:
        debug = debug_case(workdir, args.config, args.debug_repeats)  # initialises the world
        plain = plain_case(args.size_gib, args.repeats)
        for case in (debug, plain):
            samples = measure(case, workdir, warmup=args.warmup, cold=not args.no_cold)
            rows = summarise(samples)
            print_table(case, samples, rows)
            summary[case.name] = {
                "description": case.description,
                "bytes": samples.num_bytes,
                "files": samples.num_files,
                "rows": rows,
            }
        debug.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutdown_distributed()
    load_after = os.getloadavg()
    summary["load_average_before"] = load_before
    summary["load_average_after"] = load_after
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(
        f"\nreads warm (page cache) unless marked cold (fsync + POSIX_FADV_DONTNEED first); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{summary['seconds']:.0f} s"
    )
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
