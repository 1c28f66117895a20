"""The Transformer Engine steps of ``tools/gpu_check.py``.

With TE importable on CUDA they run ``model.transformer_impl=transformer_engine``. Without
a GPU (``--allow-cpu``) the same steps run with the local layers in place of TE, so every
run, export, evaluation and comparison is exercised (local against local); on a GPU
machine without TE they are skipped with the reason.

Tolerances (bf16 on the GPU; the same bounds hold trivially for the CPU stand-in):

- ``te_attention``: TE against local layers, the same checkpoint's weights, one prompt:
  ``max|dlogits| / max|logits| <= DENSE_LOGITS_RTOL`` and the prompt's loss within
  ``LOSS_RTOL`` relative. Both run bf16 GEMMs with fp32 accumulation; only the kernels
  (TE's fused norm+linear and THD flash/cuDNN attention against SDPA per document) and
  so the rounding order differ: a few bf16 steps (2^-8) on the logits.
- ``te_fp8``: ``model.fp8=hybrid`` against the bf16 TE run, the same seed (weights and
  data): the mean of the last 5 of ``--steps`` losses within ``FP8_LOSS_BAND`` relative,
  and the FP8 loss falls.
- ``te_moe``: 4 experts on every 2nd layer with ``TEGroupedMLP`` (grouped GEMM), a few
  steps, then its checkpoint under ``SequentialMLP`` (local): loss within ``LOSS_RTOL``,
  ``mean|dlogits| / mean|logits| <= MOE_LOGITS_MEAN_RTOL`` (a near-tie in the router
  may send a token to another expert in bf16, so no bound on the largest difference).
- ``te_resume``: as ``save_resume`` (first resumed step exact, later ones within
  ``LATER_RESUMED_RTOL``), with TE layers and TE's FusedAdam.
- ``te_export``: ``mm1 convert export`` of the TE checkpoint, loaded with
  ``transformers`` in fp32 on the CPU, against our TE model in bf16 on the GPU:
  ``max|dlogits| / max|logits| <= EXPORT_LOGITS_RTOL``; the local layers' distance to
  the export is reported beside it.
- ``te_eval``: ``mm1 eval`` (KV-cached generation through TE attention) on the TE
  checkpoint with ``synthetic_vqa``, 0 shots, 4 examples: it runs and writes a score.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

DENSE_LOGITS_RTOL = 2e-2
LOSS_RTOL = 1e-2
FP8_LOSS_BAND = 0.10
MOE_LOGITS_MEAN_RTOL = 2e-2
EXPORT_LOGITS_RTOL = 3e-2

TE = ("model.transformer_impl=transformer_engine",)
LOCAL = "model.transformer_impl=local"
MOE = ("model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2")


def te_overrides(ctx, core) -> Sequence[str]:
    """TE's overrides; none for the CPU stand-in; skipped on a GPU without TE."""
    if ctx.env.te is None:
        return TE
    if not ctx.env.cuda:
        return ()
    raise core.Skipped(f"Transformer Engine absent ({ctx.env.te})")


def relative_max(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def relative_mean(a, b) -> float:
    return float((a - b).abs().mean() / b.abs().mean())


def prompt_loss(logits, tokens, image_token_id: int) -> float:
    """Mean next-token cross-entropy over the prompt's text (image placeholders are never
    targets)."""
    import torch

    targets = tokens[:, 1:].flatten()
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), targets, reduction="none"
    )
    return float(losses[targets != image_token_id].mean())


def logits_of(ctx, checkpoint: Path, variants: Dict[str, Sequence[str]], hf: Path = None) -> Dict:
    import torch

    output = ctx.work / f"logits_{len(list(ctx.work.glob('logits_*')))}.pt"
    args = ["tools/gpu_check_logits.py", "--checkpoint", str(checkpoint), "--output", str(output)]
    for name, overrides in variants.items():
        args += ["--variant", f"{name}={';'.join(overrides)}"]
    if hf is not None:
        args += ["--hf", str(hf)]
    ctx.runs.run_script(*args)
    return torch.load(output)


def _expect_modules(results: Dict, name: str, wanted: str, real: bool) -> None:
    if real and wanted not in results["modules"][name]:
        raise RuntimeError(f"{name} model has no {wanted}: {results['modules'][name]}")


def _compare(results: Dict, a: str, b: str, *, max_rtol=None, mean_rtol=None) -> Dict:
    tokens = results["tokens"]
    la, lb = results["logits"][a], results["logits"][b]
    image = results["image_token_id"]
    loss_a, loss_b = prompt_loss(la, tokens, image), prompt_loss(lb, tokens, image)
    figures = {
        f"loss_{a}": loss_a,
        f"loss_{b}": loss_b,
        "loss_relative": abs(loss_a - loss_b) / abs(loss_b),
        "logits_relative_max": relative_max(la, lb),
        "logits_relative_mean": relative_mean(la, lb),
    }
    bounds = [("loss_relative", LOSS_RTOL)]
    bounds += [("logits_relative_max", max_rtol)] if max_rtol is not None else []
    bounds += [("logits_relative_mean", mean_rtol)] if mean_rtol is not None else []
    for key, bound in bounds:
        if figures[key] > bound:
            raise RuntimeError(f"{a} against {b}: {key} {figures[key]:.2e} > {bound:g}: {figures}")
    return figures


def _te_checkpoint(ctx, core, *extra: str) -> Path:
    """The save folder of a 4-step run saved at steps 2 and 4 (shared with te_resume)."""
    _, output_dir = core.reference_with_checkpoints(ctx.runs, *te_overrides(ctx, core), *extra)
    return output_dir / "ckpt"


def check_te_attention(ctx, core) -> Dict:
    real = ctx.env.te is None
    checkpoint = _te_checkpoint(ctx, core)
    results = logits_of(ctx, checkpoint, {"te": (), "local": (LOCAL,)})
    _expect_modules(results, "te", "TEDocumentAttention", real)
    figures = _compare(results, "te", "local", max_rtol=DENSE_LOGITS_RTOL)
    return {"transformer_engine": real, "modules": results["modules"]["te"], **figures}


def check_te_fp8(ctx, core) -> Dict:
    impl = te_overrides(ctx, core)
    real = ctx.env.te is None
    steps = (f"training.train_steps={ctx.args.steps}",)
    bf16, _ = ctx.runs.train(*steps, *impl)
    fp8, _ = ctx.runs.train(*steps, *impl, *(("model.fp8=hybrid",) if real else ()))
    losses = {name: [row["loss"] for row in rows] for name, rows in (("bf16", bf16), ("fp8", fp8))}
    tail = {name: sum(values[-5:]) / len(values[-5:]) for name, values in losses.items()}
    band = abs(tail["fp8"] - tail["bf16"]) / tail["bf16"]
    if not sum(losses["fp8"][-3:]) < sum(losses["fp8"][:3]):
        raise RuntimeError(f"the FP8 loss did not fall: {losses['fp8']}")
    if band > FP8_LOSS_BAND:
        raise RuntimeError(
            f"FP8's last-5 mean loss {tail['fp8']:.4f} is {band:.1%} from bf16's "
            f"{tail['bf16']:.4f} (band {FP8_LOSS_BAND:.0%})"
        )
    return {
        "fp8": "hybrid" if real else None,
        "loss_last5_bf16": tail["bf16"],
        "loss_last5_fp8": tail["fp8"],
        "relative": band,
        "band": FP8_LOSS_BAND,
        "median_step_s_fp8": sorted(r["step_time_s"] for r in fp8)[len(fp8) // 2],
    }


def check_te_moe(ctx, core) -> Dict:
    real = ctx.env.te is None
    grouped = ("model.llm.moe.grouped_gemm=true",) if real else ()
    checkpoint = _te_checkpoint(ctx, core, *MOE, *grouped)
    sequential = (LOCAL, "model.llm.moe.grouped_gemm=false")
    results = logits_of(ctx, checkpoint, {"grouped": (), "sequential": sequential})
    _expect_modules(results, "grouped", "TEGroupedMLP", real)
    _expect_modules(results, "sequential", "SequentialMLP", True)
    figures = _compare(results, "grouped", "sequential", mean_rtol=MOE_LOGITS_MEAN_RTOL)
    return {"modules": results["modules"]["grouped"], **figures}


def check_te_resume(ctx, core) -> Dict:
    return {**core.resume_and_compare(ctx.runs, *te_overrides(ctx, core))}


def check_te_export(ctx, core) -> Dict:
    checkpoint = _te_checkpoint(ctx, core)
    folder = ctx.work / "te_export"
    ctx.runs.run_script(
        "-m", "mm1_megatron.conversion.cli", "export",
        "--checkpoint", str(checkpoint), "--output", str(folder),
    )  # fmt: skip
    results = logits_of(ctx, checkpoint, {"te": (), "local": (LOCAL,)}, hf=folder)
    hf = results["logits"]["hf"]
    figures = {
        "te_vs_hf_relative_max": relative_max(results["logits"]["te"], hf),
        "local_vs_hf_relative_max": relative_max(results["logits"]["local"], hf),
        "rtol": EXPORT_LOGITS_RTOL,
    }
    if figures["te_vs_hf_relative_max"] > EXPORT_LOGITS_RTOL:
        raise RuntimeError(f"the export's logits differ from our TE model's: {figures}")
    return figures


def check_te_eval(ctx, core) -> Dict:
    checkpoint = _te_checkpoint(ctx, core)
    output = ctx.work / "te_eval"
    ctx.runs.run_script(
        "-m", "mm1_megatron.evaluation.cli", "--checkpoint", str(checkpoint),
        "eval.tasks=[synthetic_vqa]", "eval.shots=[0]", "eval.limit=4", "eval.max_new_tokens=4",
        "--output", str(output), "logging.tensorboard=false",
    )  # fmt: skip
    document = json.loads((output / "results.json").read_text())
    shot = document["tasks"]["synthetic_vqa"]["shots"]["0"]
    if shot["num_examples"] != 4 or not 0.0 <= shot["score"] <= 1.0:
        raise RuntimeError(f"mm1 eval wrote {shot} for 4 examples")
    return {"step": document["step"], "synthetic_vqa_0shot": shot}


def te_steps(core) -> list:
    """``core`` is ``gpu_check`` itself (its ``Step``, ``Skipped`` and run helpers)."""

    def step(function, estimate_s):
        return core.Step(
            function.__name__[len("check_") :], lambda ctx: function(ctx, core), estimate_s
        )

    start = core.START_S
    return [
        # The 4-step TE run saved at 2 and 4 (one process, TE's own kernels to JIT: ~20 s)
        # and one logits process (two model builds, no training).
        step(check_te_attention, 2 * start + 20 + 6),
        # Two TE runs of --steps (50 x 0.05 s), the FP8 one adds its scaling kernels.
        step(check_te_fp8, 2 * start + 15),
        # One MoE run (4 steps, 2 saves), one logits process.
        step(check_te_moe, 2 * start + 10),
        # The reference is te_attention's run: one resumed process.
        step(check_te_resume, start + 3),
        # mm1 convert export on the CPU (~5 s for the debug model) and one logits process
        # that also loads the export with transformers (~5 s of imports).
        step(check_te_export, 2 * start + 10),
        # mm1 eval: one process, 4 prompts x 4 tokens.
        step(check_te_eval, start + 5),
    ]
