#!/usr/bin/env python
"""The checks only a GPU can make, as named steps, in one short run (under 8 minutes on
one H100/H200). Prints a table and writes the figures as JSON.

    make gpu-check            # = python tools/gpu_check.py --output gpu_check.json
    python tools/gpu_check.py --wheels wheels/ ...   # install missing packages offline first

Steps (each independent; a failure is reported and the next step runs):

- ``startup``: ``mm1-train`` on the debug config in bf16 with NCCL: start-up (the
  collectives of our code on CUDA tensors), 50 steps, loss falls, median step time, MFU.
- ``fp32_vs_cpu``: the first 3 steps of the debug config in fp32 on the GPU and on the CPU
  (``CUDA_VISIBLE_DEVICES=""``); the losses must agree within 1e-3 relative.
- ``throughput``: MM1-3B widths (ViT-H/14 at 378, C-Abstractor with 144 tokens,
  ``--throughput-layers`` 3B decoder layers), 4096 tokens of caption sequences with 16
  images, bf16, for per-document attention and the dense-mask reference: tokens/s,
  images/s, TFLOP/s, MFU and peak memory of each.
- ``save_resume``: 4 steps with a checkpoint at step 2, then a resume from it; the
  resumed losses must equal the uninterrupted ones. Reports the optimizer class that
  megatron-core chose (TE/apex ``FusedAdam`` when installed).
- ``dali_vs_pil``: DALI's GPU (nvJPEG, ``mixed``) decoder against PIL on generated JPEGs
  in every resize mode; the largest difference in 8-bit steps (CPU tests allow 3).
- ``peak_flops``: the GPU's name and the dense BF16 peak used for MFU.

``--allow-cpu`` runs what can run without a GPU (a smoke test of this script itself).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("gpu_check")


def _train(
    output_dir: Path, *overrides: str, config: str = "configs/debug.yaml", env_extra=None
) -> List[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "mm1_megatron.train",
        "--config",
        config,
        f"logging.output_dir={output_dir}",
        "logging.tensorboard=false",
        *overrides,
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"mm1-train exited {result.returncode}: {result.stderr[-2000:]}")
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def check_startup(work: Path, steps: int) -> Dict:
    rows = _train(work / "startup", f"training.train_steps={steps}")
    losses = [row["loss"] for row in rows]
    times = [row["step_time_s"] for row in rows[2:]] or [rows[-1]["step_time_s"]]
    start, end = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    if not end < start:
        raise RuntimeError(f"loss did not fall: {start:.3f} -> {end:.3f}")
    return {
        "steps": len(rows),
        "loss_first3": start,
        "loss_last3": end,
        "median_step_s": statistics.median(times),
        "mfu": rows[-1].get("mfu"),
    }


def check_save_resume(work: Path) -> Dict:
    ckpt = work / "ckpt"
    reference = _train(
        work / "full",
        "training.train_steps=4",
        f"checkpoint.save_dir={ckpt}",
        "checkpoint.save_interval=2",
    )
    resumed = _train(
        work / "resumed", "training.train_steps=4", f"checkpoint.load_dir={ckpt / 'step_00000002'}"
    )
    expected = [row["loss"] for row in reference[2:]]
    got = [row["loss"] for row in resumed]
    if got != expected:
        raise RuntimeError(f"resumed losses {got} differ from the uninterrupted {expected}")
    from megatron.core.optimizer import distrib_optimizer

    optimizer = (
        "TE FusedAdam"
        if distrib_optimizer.USING_TE_OPTIMIZER
        else "apex FusedAdam"
        if distrib_optimizer.USING_APEX_OPTIMIZER
        else "torch AdamW"
    )
    return {"resumed_losses": got, "optimizer": optimizer}


def check_fp32_vs_cpu(work: Path) -> Dict:
    settings = ("training.train_steps=3", "training.precision=fp32")
    device = _train(work / "device", *settings)
    cpu = _train(work / "cpu", *settings, env_extra={"CUDA_VISIBLE_DEVICES": ""})
    device_losses, cpu_losses = [r["loss"] for r in device], [r["loss"] for r in cpu]
    worst = max(abs(a - b) / abs(b) for a, b in zip(device_losses, cpu_losses))
    if worst > 1e-3:
        raise RuntimeError(
            f"fp32 losses {device_losses} differ from the CPU's {cpu_losses} "
            f"by {worst:.2e} relative (allowed 1e-3)"
        )
    return {"device_losses": device_losses, "cpu_losses": cpu_losses, "max_relative": worst}


def throughput_overrides(layers: int, tiny: bool) -> List[str]:
    """An MM1-3B-wide slice at 4096 tokens of 16-image caption sequences (tiny: debug)."""
    common = [
        "data.mixture={caption: 1.0}",
        "training.micro_batch_size=1",
        "training.global_batch_size=1",
        "training.train_steps=6",
        "logging.log_interval=1",
    ]
    if tiny:
        return common + ["training.seq_length=512", "model.llm.max_sequence_length=512"]
    return common + [
        f"model.llm.num_layers={layers}",
        "parallel.tensor_parallel_size=1",
        "parallel.pipeline_parallel_size=1",
        "parallel.sequence_parallel=false",
        "training.seq_length=4096",
        "training.precision=bf16",
        "data.max_images_per_sequence=16",
        "data.caption_window=16",
    ]


def _median(rows: List[dict], key: str):
    values = [row[key] for row in rows if row.get(key) is not None]
    return statistics.median(values) if values else None


def check_throughput(work: Path, layers: int, tiny: bool) -> Dict:
    config = "configs/debug.yaml" if tiny else "configs/mm1_3b.yaml"
    figures = {}
    for attention in ("per_document", "dense_mask_reference"):
        rows = _train(
            work / attention,
            *throughput_overrides(layers, tiny),
            f"model.attention={attention}",
            config=config,
        )
        timed = rows[2:] or rows[-1:]  # the first steps warm up kernels and allocators
        figures[attention] = {
            key: _median(timed, key)
            for key in (
                "tokens_per_s",
                "images_per_s",
                "tflops_per_s_per_device",
                "mfu",
                "peak_memory_gib",
                "step_time_s",
            )
        }
    new, reference = figures["per_document"], figures["dense_mask_reference"]
    figures["speedup_tokens_per_s"] = new["tokens_per_s"] / reference["tokens_per_s"]
    figures["decoder_layers"] = None if tiny else layers
    return figures


def _jpegs() -> List[bytes]:
    import numpy as np
    from PIL import Image

    blobs = []
    for seed, (width, height) in enumerate([(640, 480), (333, 500), (1024, 768), (97, 61)]):
        rng = np.random.default_rng(seed)
        ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
        pixels = (ramp + rng.integers(0, 40, (height, width, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return blobs


def check_dali_vs_pil(work: Path) -> Dict:
    import torch

    from mm1_megatron.data.pipeline.images import RESIZE_MODES, build_image_decoder

    mean, std, blobs = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28), _jpegs()
    figures = {}
    for mode in RESIZE_MODES:
        kwargs = dict(image_size=224, mean=mean, std=std, resize_mode=mode)
        dali = build_image_decoder("dali", **kwargs)
        pil = build_image_decoder("pil", **kwargs)
        worst = 0.0
        for a, b in zip(dali.decode(blobs), pil.decode(blobs)):
            if not isinstance(a, torch.Tensor):
                raise RuntimeError(f"DALI ({mode}) returned {a} for a valid JPEG")
            steps = (a.float() - b.float()).abs() * torch.tensor(std).view(3, 1, 1) * 255
            worst = max(worst, float(steps.max()))
        figures[mode] = {
            "max_8bit_steps": worst,
            "device": "gpu" if dali.device_id is not None else "cpu",
        }
    return figures


def check_peak_flops(work: Path) -> Dict:
    import torch

    from mm1_megatron.training.flops import dense_bf16_peak_flops

    name = torch.cuda.get_device_name(0)
    return {"device": name, "dense_bf16_peak_flops": dense_bf16_peak_flops(name)}


# What a GPU machine with CUDA torch but no network may lack; see docs/gpu.md for the
# download command that fills the folder.
OFFLINE_REQUIREMENTS = [
    "megatron-core==0.19.2",
    "pyyaml",
    "sentencepiece",
    "pillow",
    "tensorboard",
    "psutil",
    "numpy",
]


def install_from_wheels(folder: Path) -> None:
    """``pip install --no-index`` of the package (editable) and what it needs from ``folder``."""
    if not folder.is_dir():
        raise SystemExit(f"--wheels {folder}: not a folder")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    for command in (pip + OFFLINE_REQUIREMENTS, pip + ["--no-deps", "-e", str(REPO)]):
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    logger.info("installed from %s: %s", folder, ", ".join(OFFLINE_REQUIREMENTS))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--throughput-layers", type=int, default=8, help="3B decoder layers in the throughput slice"
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="a folder of wheels to install missing packages from (offline)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run the steps that work without a GPU (tests this script)",
    )
    parser.add_argument("--only", default="", help="comma-separated step names to run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.wheels is not None:
        install_from_wheels(args.wheels)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        logger.error("no GPU visible; use --allow-cpu for a CPU smoke run")
        return 2
    steps: Dict[str, Callable[[Path], Dict]] = {
        "startup": lambda work: check_startup(work, args.steps),
        "save_resume": check_save_resume,
        "fp32_vs_cpu": check_fp32_vs_cpu,
        "throughput": lambda work: check_throughput(work, args.throughput_layers, not cuda),
        "dali_vs_pil": check_dali_vs_pil,
    }
    if cuda:
        steps["peak_flops"] = check_peak_flops
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(steps))
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {sorted(steps)}")
        steps = {name: step for name, step in steps.items() if name in wanted}
    results, failed = {"cuda": cuda}, 0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, step in steps.items():
            start = time.perf_counter()
            try:
                figures = step(Path(tmp) / name)
                status = "ok"
            except Exception as exc:  # report and go on: every step is independent
                figures, status, failed = {"error": str(exc)[-1500:]}, "FAILED", failed + 1
                logger.debug("%s", traceback.format_exc())
            seconds = time.perf_counter() - start
            results[name] = {"status": status, "seconds": round(seconds, 1), **figures}
            logger.info(
                "%-12s %-6s %6.1f s  %s",
                name,
                status,
                seconds,
                json.dumps(figures, default=str)[:300],
            )
    args.output.write_text(json.dumps(results, indent=1, default=str))
    logger.info("figures written to %s", args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
