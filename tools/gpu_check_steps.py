"""The steps of ``tools/gpu_check.py`` that need no Transformer Engine: start-up, resume,
fp32 against the CPU, throughput, DALI against PIL, the GPU's peak (see its docstring)."""

from __future__ import annotations

import io
import statistics
from typing import Dict, List


def check_startup(ctx, core) -> Dict:
    rows, _ = ctx.runs.train(f"training.train_steps={ctx.args.steps}")
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


def optimizer_in_use() -> str:
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.USING_TE_OPTIMIZER:
        return "TE FusedAdam"
    return "apex FusedAdam" if distrib_optimizer.USING_APEX_OPTIMIZER else "torch AdamW"


def check_save_resume(ctx, core) -> Dict:
    return {**core.resume_and_compare(ctx.runs), "optimizer": optimizer_in_use()}


def check_fp32_vs_cpu(ctx, core) -> Dict:
    settings = ("training.train_steps=3", "training.precision=fp32")
    device, _ = ctx.runs.train(*settings)
    cpu, _ = ctx.runs.train(*settings, env_extra={"CUDA_VISIBLE_DEVICES": ""})
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


def check_throughput(ctx, core) -> Dict:
    tiny, layers = not ctx.env.cuda, ctx.args.throughput_layers
    config = "configs/debug.yaml" if tiny else "configs/mm1_3b.yaml"
    figures = {}
    for attention in ("per_document", "dense_mask_reference"):
        rows, _ = ctx.runs.train(
            *throughput_overrides(layers, tiny), f"model.attention={attention}", config=config
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


def check_dali_vs_pil(ctx, core) -> Dict:
    if ctx.env.dali:
        raise core.Skipped(f"DALI absent ({ctx.env.dali})")
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
        if worst > 3:
            raise RuntimeError(
                f"DALI ({mode}) differs from PIL by {worst:.1f} 8-bit steps (allowed 3)"
            )
        figures[mode] = {
            "max_8bit_steps": worst,
            "device": "gpu" if dali.device_id is not None else "cpu",
        }
    return figures


def check_peak_flops(ctx, core) -> Dict:
    if not ctx.env.cuda:
        raise core.Skipped("no CUDA device")
    import torch

    from mm1_megatron.training.flops import dense_bf16_peak_flops

    name = torch.cuda.get_device_name(0)
    return {"device": name, "dense_bf16_peak_flops": dense_bf16_peak_flops(name)}


def base_steps(core) -> list:
    """``core`` is ``gpu_check`` itself (its ``Step``, ``Skipped`` and run helpers)."""

    def step(function, estimate_s):
        name = function.__name__[len("check_") :]
        return core.Step(name, lambda ctx: function(ctx, core), estimate_s)

    start = core.START_S
    return [
        # 1 process, + first torch.compile, 50 x 0.05 s
        step(check_startup, start + 30 + 5),
        # 2 processes, 3 saves, 8 steps
        step(check_save_resume, 2 * start + 6 + 2),
        # 1 GPU process (fp32: no fused kernels to compile), 1 CPU process on 16 cores
        step(check_fp32_vs_cpu, 2 * start + 5),
        # 2 processes with ViT-H + 8 x 3B layers: ~10 s CPU draw each, compile, 6 x ~1 s
        step(check_throughput, 2 * (start + 10 + 20 + 6)),
        step(check_dali_vs_pil, 15),
        step(check_peak_flops, 1),
    ]
