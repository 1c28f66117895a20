#!/usr/bin/env python
"""The checks only a GPU can make, as named steps, in one short run (estimated under 8
minutes on one H100). Prints each step's estimate before it runs and its measured time
after, a line for every accelerator it skips, and writes the figures as JSON.

    make gpu-check                                  # .venv's python, or $(PYTHON) without one
    python tools/gpu_check.py --wheels wheels/      # a bare CUDA-torch machine, offline

Steps (each independent; a failure is reported and the next step runs; a step whose
accelerator is absent is skipped with the reason):

- ``startup``: ``mm1 train`` on the debug config in bf16 with NCCL: start-up, 50 steps,
  the loss falls, median step time, MFU.
- ``save_resume``: 4 steps with a checkpoint at step 2, then a resume from it. The first
  resumed step's loss must equal the uninterrupted one exactly (weights, data position
  and RNG restored); later steps within ``LATER_RESUMED_RTOL`` (bf16 backward kernels on
  CUDA are not deterministic). Reports the optimizer megatron-core chose.
- ``fp32_vs_cpu``: the first 3 fp32 steps on the GPU and on the CPU, within 1e-3 relative.
- ``throughput``: MM1-3B widths, 4096-token caption sequences with 16 images, bf16, per-
  document attention against the dense-mask reference: tokens/s, MFU, peak memory.
- ``dali_vs_pil``: DALI's nvJPEG decoder against PIL (skipped without DALI).
- ``peak_flops``: the GPU's name and the dense BF16 peak used for MFU.
- ``te_*`` (``tools/gpu_check_te.py``): Transformer Engine attention, FP8, grouped-GEMM
  MoE, resume, export and evaluation; skipped without TE on CUDA.

``--allow-cpu`` runs everything that can run without a GPU, the TE steps with the local
layers in place of TE (a smoke test of this script's plumbing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("gpu_check")

# Resumed losses after the first resumed step: step 3's backward runs CUDA kernels whose
# reductions are not ordered (SDPA backward, cuDNN conv weight gradients), so step 4
# starts from weights that may differ in the last bit. 1e-3 relative allows that noise
# (estimated below 1e-4: bf16 gradient rounding through Adam's moments moves a weight by
# ~1e-6, a bf16 weight step is ~1e-4) and still catches a lost optimizer state, which
# moves each weight by about the learning rate (3e-3 against weights of ~2e-2).
LATER_RESUMED_RTOL = 1e-3


class Skipped(Exception):
    """The step needs something this machine lacks; the reason is printed, not a failure."""


@dataclass
class Environment:
    cuda: bool
    te: Optional[str]  # None when Transformer Engine runs with CUDA, else why not
    dali: Optional[str]
    apex: Optional[str]
    compiler: Optional[str]  # the C compiler Triton would use, None when there is none

    def common_overrides(self) -> List[str]:
        # Triton (torch.compile of the fused kernels) builds a small C launcher per kernel.
        return ["training.fused_kernels=false"] if self.cuda and not self.compiler else []


def _import_problem(module: str, needs_cuda: bool, cuda: bool) -> Optional[str]:
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return f"{module} is not installed"
    try:
        importlib.import_module(module)
    except Exception as exc:  # TE and apex fail in many ways without their CUDA libraries
        return f"{module} does not import: {type(exc).__name__}: {str(exc)[:200]}"
    if needs_cuda and not cuda:
        return "no CUDA device"
    return None


def c_compiler() -> Optional[str]:
    """The compiler Triton looks for: $CC, else cc, gcc or clang on PATH."""
    if os.environ.get("CC"):
        return shutil.which(os.environ["CC"])
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def probe_environment(cuda: bool) -> Environment:
    return Environment(
        cuda=cuda,
        te=_import_problem("transformer_engine.pytorch", True, cuda),
        dali=_import_problem("nvidia.dali", False, cuda),
        apex=_import_problem("apex", True, cuda),
        compiler=c_compiler(),
    )


def report_environment(env: Environment) -> None:
    for name, problem, without in (
        (
            "Transformer Engine",
            env.te,
            "the te_* steps are skipped"
            if env.cuda
            else "the te_* steps run local layers in its place (CPU smoke run)",
        ),
        ("DALI", env.dali, "dali_vs_pil is skipped"),
        ("apex", env.apex, "no gradient-accumulation fusion; Adam from TE or torch"),
    ):
        logger.info(
            "%-18s %s", name, "present" if problem is None else f"absent ({problem}): {without}"
        )
    if env.compiler:
        logger.info("%-18s %s", "C compiler", env.compiler)
    elif env.cuda:
        logger.info(
            "%-18s none (Triton needs one): training.fused_kernels=false in every run",
            "C compiler",
        )


class Runs:
    """``mm1 train`` runs in fresh processes, each made once per check (steps share them)."""

    def __init__(self, root: Path, env: Environment):
        self.root, self.env, self.done = root, env, {}

    def train(
        self, *overrides: str, config: str = "configs/debug.yaml", env_extra=None
    ) -> Tuple[List[dict], Path]:
        """Rows of metrics.jsonl and the run's folder; ``{out}`` in an override is that folder."""
        key = (config, overrides, tuple(sorted((env_extra or {}).items())))
        if key not in self.done:
            output_dir = self.root / f"run{len(self.done):02d}"
            rows = _train(
                output_dir,
                *self.env.common_overrides(),
                *(item.replace("{out}", str(output_dir)) for item in overrides),
                config=config,
                env_extra=env_extra,
            )
            self.done[key] = (rows, output_dir)
        return self.done[key]

    def run_script(self, *args: str, timeout: int = 900) -> str:
        env = _clean_env()
        result = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"{args[:3]} exited {result.returncode}: {result.stderr[-2000:]}")
        return result.stdout


def _clean_env(env_extra=None) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _train(
    output_dir: Path, *overrides: str, config: str = "configs/debug.yaml", env_extra=None
) -> List[dict]:
    command = [
        sys.executable,
        "-m",
        "mm1_megatron.train",
        "--config",
        config,
        f"logging.output_dir={output_dir}",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        *overrides,
    ]
    result = subprocess.run(
        command, cwd=REPO, env=_clean_env(env_extra), capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise RuntimeError(f"mm1 train exited {result.returncode}: {result.stderr[-2000:]}")
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses_by_step(rows: Sequence[dict]) -> Dict[int, float]:
    return {int(row["step"]): float(row["loss"]) for row in rows if "loss" in row}


def compare_resumed(reference: Sequence[dict], resumed: Sequence[dict], rtol: float) -> Dict:
    """The first resumed step exactly, the later ones within ``rtol`` relative."""
    expected, got = losses_by_step(reference), losses_by_step(resumed)
    steps = sorted(got)
    if not steps or any(step not in expected for step in steps):
        raise RuntimeError(f"resumed steps {steps} are not all in the reference {sorted(expected)}")
    first = steps[0]
    if got[first] != expected[first]:
        raise RuntimeError(
            f"first resumed step {first}: loss {got[first]!r} != uninterrupted {expected[first]!r}"
        )
    worst = max((abs(got[s] - expected[s]) / abs(expected[s]) for s in steps[1:]), default=0.0)
    if worst > rtol:
        raise RuntimeError(
            f"resumed losses {[got[s] for s in steps]} differ from the uninterrupted "
            f"{[expected[s] for s in steps]} by {worst:.2e} relative after step {first} "
            f"(allowed {rtol:g})"
        )
    return {
        "resumed_losses": [got[s] for s in steps],
        "first_resumed_step_exact": True,
        "later_max_relative": worst,
        "later_rtol": rtol,
    }


SAVE_RESUME_RUN = ("training.train_steps=4", "checkpoint.save_interval=2")


def reference_with_checkpoints(runs: Runs, *overrides: str) -> Tuple[List[dict], Path]:
    """4 steps saved at steps 2 and 4; the checkpoint folder is ``<run>/ckpt``."""
    return runs.train(*SAVE_RESUME_RUN, *overrides, "checkpoint.save_dir={out}/ckpt")


def resume_and_compare(runs: Runs, *overrides: str) -> Dict:
    reference, output_dir = reference_with_checkpoints(runs, *overrides)
    step2 = output_dir / "ckpt" / "step_00000002"
    resumed, _ = runs.train("training.train_steps=4", *overrides, f"checkpoint.load_dir={step2}")
    return compare_resumed(reference, resumed, LATER_RESUMED_RTOL)


@dataclass
class Context:
    args: argparse.Namespace
    env: Environment
    runs: Runs
    work: Path
    cache: Dict = field(default_factory=dict)  # results steps share (export folders ...)


@dataclass
class Step:
    name: str
    run: Callable[[Context], Dict]
    # Seconds on one H100 (not yet measured there). Each fresh mm1 train process costs
    # about START_S (imports ~8 s, CUDA and NCCL ~4 s, CPU weight draw and model build
    # ~3 s); the first bf16 run adds torch.compile of the fused kernels (~30 s, later runs
    # hit Inductor's cache); a debug step takes ~0.05 s, a checkpoint save ~2 s.
    estimate_s: float


START_S = 15


# What a GPU machine with CUDA torch but no network lacks: tools/gpu_wheels.py downloads
# these (without their dependencies) into the folder ``--wheels`` installs from.
def install_from_wheels(folder: Path, requirements: Sequence[str]) -> None:
    """``pip install --no-index`` of ``requirements`` and of this repository (editable, no
    build isolation: setuptools comes from the folder or the machine) from ``folder``."""
    if not folder.is_dir():
        raise SystemExit(f"--wheels {folder}: not a folder")
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(folder)]
    pip += ["--no-deps"]
    commands = (pip + list(requirements), pip + ["--no-build-isolation", "-e", str(REPO)])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    logger.info(
        "installed from %s: %d wheels and this repository (editable)", folder, len(requirements)
    )


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def all_steps() -> List[Step]:
    core = SimpleNamespace(**globals())
    return _load_sibling("gpu_check_steps").base_steps(core) + _load_sibling(
        "gpu_check_te"
    ).te_steps(core)


def run_steps(steps: Sequence[Step], ctx: Context) -> Tuple[Dict, int]:
    results, failed = {}, 0
    total = sum(step.estimate_s for step in steps)
    logger.info("%d steps, estimated %.0f s (%.1f min) on one H100", len(steps), total, total / 60)
    for step in steps:
        logger.info("%-14s start  (estimated %4.0f s)", step.name, step.estimate_s)
        start = time.perf_counter()
        try:
            figures, status = step.run(ctx), "ok"
        except Skipped as reason:
            figures, status = {"reason": str(reason)}, "skipped"
        except Exception as exc:  # report and go on: every step is independent
            figures, status, failed = {"error": str(exc)[-1500:]}, "FAILED", failed + 1
            logger.debug("%s", traceback.format_exc())
        seconds = time.perf_counter() - start
        results[step.name] = {
            "status": status,
            "seconds": round(seconds, 1),
            "estimate_s": step.estimate_s,
            **figures,
        }
        text = figures["reason"] if status == "skipped" else json.dumps(figures, default=str)
        logger.info(
            "%-14s %-7s %6.1f s (estimated %4.0f s)  %s",
            step.name, status, seconds, step.estimate_s, text[:300],
        )  # fmt: skip
    return results, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=Path("gpu_check.json"))
    parser.add_argument(
        "--steps", type=int, default=50, help="training steps of startup and te_fp8"
    )
    parser.add_argument(
        "--throughput-layers", type=int, default=8, help="3B decoder layers in the throughput slice"
    )
    parser.add_argument(
        "--wheels",
        type=Path,
        default=None,
        help="a folder from tools/gpu_wheels.py to install missing packages from (offline)",
    )
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run what works without a GPU, TE steps on local layers (tests this script)",
    )
    parser.add_argument("--only", default="", help="comma-separated step names to run")
    parser.add_argument("--list", action="store_true", help="print the steps and estimates")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    steps = all_steps()
    if args.list:
        for step in steps:
            print(f"{step.name:14s} {step.estimate_s:5.0f} s")
        print(f"{'total':14s} {sum(s.estimate_s for s in steps):5.0f} s")
        return 0
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {step.name for step in steps})
        if unknown:
            parser.error(f"unknown steps {unknown}; choose from {[s.name for s in steps]}")
        steps = [step for step in steps if step.name in wanted]
    if args.wheels is not None:
        install_from_wheels(args.wheels, _load_sibling("gpu_wheels").RUNTIME_REQUIREMENTS)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        logger.error("no GPU visible; use --allow-cpu for a CPU smoke run")
        return 2
    env = probe_environment(cuda)
    report_environment(env)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(args=args, env=env, runs=Runs(Path(tmp), env), work=Path(tmp))
        results, failed = run_steps(steps, ctx)
    results = {
        "cuda": cuda,
        "environment": {k: v for k, v in vars(env).items() if k != "cuda"},
        **results,
    }
    args.output.write_text(json.dumps(results, indent=1, default=str))
    logger.info("figures written to %s", args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
