#!/usr/bin/env python
"""Time and memory of a training step of each post-training method, against supervised
fine-tuning, on the debug model (CPU or one GPU):

- ``sft``: full fine-tuning on conversations (``configs/debug_sft.yaml``), the baseline;
- ``lora_sft``: the same with rank-8 adapters on the decoder, the connector trained in
  full, the rest frozen (``configs/debug_lora.yaml``);
- ``dpo``: DPO on preference pairs with full weights, the reference a frozen copy of the
  starting weights (``configs/debug_dpo.yaml``);
- ``dpo_lora``: DPO with ``model.lora.rank=8``, the reference the model with its adapters
  off.

All four start from the same base checkpoint: ``--base``, or one this script first trains
(``mm1 train --config configs/debug.yaml training.train_steps=2``) in a temporary folder.
Each measurement is one ``mm1 train`` child process of ``--steps`` steps; its
``metrics.jsonl`` gives each step's ``step_time_s`` (the first ``--warmup`` steps
dropped), and ``os.wait4`` the child's peak resident set (the whole process: Python,
torch and the data pipeline included, so the differences are what the methods add).
The variants alternate round by round (``--repeats`` rounds: A B C D A B C D ...) so
machine noise spreads over all alike.

Printed per variant: median, min and max step time over the kept steps of all rounds,
N, and the ratio of its median to ``sft``'s; the peak RSS (MB) median, min and max over
the rounds and its ratio to ``sft``'s; the trainable parameters (from the config), and
the median text tokens and images (tiles) per step, since SFT and DPO batches differ.
How to read it: DPO is expected to cost more per step than SFT, by the forward-only
pass of the reference each step (one forward more: about a third of a forward and
backward); its batches differ too (compare the tokens and images per step). LoRA spares
the gradients and Adam state of the frozen weights, but on the tiny debug model (1.1M
parameters) that state is a few MB: what it saves here is mostly activations and
backward work, as nothing back-propagates into the frozen parts (debug_lora.yaml trains
the adapters and the connector only, so the vision encoder runs forward only, where
SFT trains it). At real size the optimizer state is what LoRA saves most. Step time is
the wall time of the whole step (data wait included); on a shared machine read the
medians, not the extremes.

    python tools/bench_post_training.py                       # about 10 minutes on 2 shared cores
    python tools/bench_post_training.py --base runs/debug/ckpt --variants sft dpo
    python tools/bench_post_training.py --steps 3 --warmup 1 --repeats 1 \\
        --variants sft dpo_lora --json                        # smoke

``--json`` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm1_megatron.config import load_config  # noqa: E402
from mm1_megatron.models.param_count import count_parameters, lora_parameters  # noqa: E402

# name: (config, overrides)
VARIANTS: Dict[str, tuple] = {
    "sft": ("configs/debug_sft.yaml", []),
    "lora_sft": ("configs/debug_lora.yaml", []),
    "dpo": ("configs/debug_dpo.yaml", []),
    "dpo_lora": ("configs/debug_dpo.yaml", ["model.lora.rank=8"]),
}
BASELINE = "sft"
BASE_CONFIG = "configs/debug.yaml"
BASE_STEPS = 2
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")


def _stats(values: Sequence[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    return env


def train(config: str, overrides: Sequence[str], folder: Path, timeout: float) -> int:
    """``mm1 train --config config overrides`` in a child process (its output in
    ``folder/train.log``); returns the child's peak RSS in kB (``os.wait4``)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mm1_megatron.train", "--config", config, *overrides]
    log = folder / "train.log"
    with open(log, "w") as output:
        child = subprocess.Popen(
            command, cwd=REPO, env=_env(), stdout=output, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                pid, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.1)
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} exited {child.returncode}:\n{tail}")
    return usage.ru_maxrss  # kB on Linux


def build_base(folder: Path, timeout: float) -> Path:
    """A short debug pre-training run; returns its checkpoint folder."""
    ckpt = folder / "ckpt"
    train(
        BASE_CONFIG,
        [
            f"training.train_steps={BASE_STEPS}",
            f"checkpoint.save_dir={ckpt}",
            f"logging.output_dir={folder / 'run'}",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
        ],
        folder,
        timeout,
    )
    return ckpt


def trainable_parameters(config: str, overrides: Sequence[str]) -> int:
    """What the optimizer updates, from the config: adapters and ``fully_trained`` parts
    with LoRA, else every part not in ``model.freeze``."""
    model = load_config(str(REPO / config), list(overrides)).model
    counts = count_parameters(model)
    parts = {
        "vision_encoder": counts.vision_encoder,
        "connector": counts.connector,
        "language_model": counts.language_model,
    }
    if model.lora.enabled:
        return lora_parameters(model) + sum(parts[p] for p in model.lora.fully_trained)
    return sum(n for p, n in parts.items() if p not in model.freeze)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(args: argparse.Namespace, base: Path, workdir: Path) -> Dict[str, dict]:
    runs: Dict[str, dict] = {
        name: {"step_s": [], "rss_mb": [], "tokens": [], "images": [], "checkpoint_bytes": []}
        for name in args.variants
    }
    for round_number in range(args.repeats):
        for name in args.variants:
            config, extra = VARIANTS[name]
            out = workdir / f"{name}_{round_number}"
            overrides = [
                *extra,
                f"checkpoint.initial_weights={base}",
                f"training.train_steps={args.steps}",
                f"logging.output_dir={out}",
                "logging.tensorboard=false",
                "logging.log_interval=1",
                "logging.progress_bar=false",
            ]
            if args.checkpoint_size:
                overrides.append(f"checkpoint.save_dir={out / 'ckpt'}")
            started = time.perf_counter()
            rss_kb = train(config, overrides, out, args.timeout)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            kept = [row for row in rows if row["step"] > args.warmup]
            figures = runs[name]
            figures["step_s"] += [float(row["step_time_s"]) for row in kept]
            figures["tokens"] += [float(row["num_text_tokens"]) for row in kept]
            figures["images"] += [float(row["num_images"]) for row in kept]
            figures["rss_mb"].append(rss_kb / 1024)
            if args.checkpoint_size:
                (step,) = sorted((out / "ckpt").glob("step_*"))
                figures["checkpoint_bytes"].append(_folder_bytes(step))
            if not args.json:
                print(
                    f"  round {round_number + 1}/{args.repeats} {name}: "
                    f"{time.perf_counter() - started:.0f} s, peak RSS {rss_kb / 1024:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def summarise(args: argparse.Namespace, runs: Dict[str, dict]) -> Dict[str, dict]:
    results = {}
    for name in args.variants:
        figures = runs[name]
        config, extra = VARIANTS[name]
        results[name] = {
            "config": config,
            "overrides": extra,
            "step_time_s": _stats(figures["step_s"]),
            "peak_rss_mb": _stats(figures["rss_mb"]),
            "trainable_parameters": trainable_parameters(config, extra),
            "text_tokens_per_step": statistics.median(figures["tokens"]),
            "images_per_step": statistics.median(figures["images"]),
        }
        if figures["checkpoint_bytes"]:
            results[name]["checkpoint_bytes"] = statistics.median(figures["checkpoint_bytes"])
    baseline = results.get(BASELINE)
    for result in results.values():
        for key in ("step_time_s", "peak_rss_mb"):
            ratio = None if baseline is None else result[key]["median"] / baseline[key]["median"]
            result[f"{key}_over_{BASELINE}"] = ratio  # of the medians
    return results


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def print_table(results: Dict[str, dict], header: str) -> None:
    print(header)
    print(
        f"{'variant':<9} {'step s: median [min, max]':<27} {'N':>3} {'/sft':>6}   "
        f"{'peak RSS MB: median [min, max]':<31} {'/sft':>6} {'trainable':>10} "
        f"{'tokens/step':>11} {'images/step':>11}"
    )
    for name, r in results.items():
        t, m = r["step_time_s"], r["peak_rss_mb"]
        step = f"{t['median']:.3f} [{t['min']:.3f}, {t['max']:.3f}]"
        rss = f"{m['median']:.0f} [{m['min']:.0f}, {m['max']:.0f}]"
        line = (
            f"{name:<9} {step:<27} {t['n']:>3} {_ratio(r['step_time_s_over_sft']):>6}   "
            f"{rss:<31} {_ratio(r['peak_rss_mb_over_sft']):>6} {r['trainable_parameters']:>10,} "
            f"{r['text_tokens_per_step']:>11.0f} {r['images_per_step']:>11.0f}"
        )
        if "checkpoint_bytes" in r:
            line += f"  checkpoint {r['checkpoint_bytes'] / 2**20:.1f} MiB"
        print(line)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--base",
        help="checkpoint every variant starts from (checkpoint.initial_weights); "
        f"default: a {BASE_STEPS}-step {BASE_CONFIG} run trained first, in a temporary folder",
    )
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run dropped")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the variants")
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME"
    )
    parser.add_argument(
        "--checkpoint-size",
        action="store_true",
        help="each run also saves a checkpoint at its end and its size is reported "
        "(the peak RSS then includes the save)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per training run")
    parser.add_argument("--workdir", help="where the runs go (kept); default a temporary folder")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    if args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup} leaves no step of --steps {args.steps}")
    args.variants = list(dict.fromkeys(args.variants))  # in the given order, once each
    return args


def run(args: argparse.Namespace, workdir: Path) -> int:
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    base = Path(args.base).resolve() if args.base else None
    if base is None:
        if not args.json:
            print(f"training a {BASE_STEPS}-step base ({BASE_CONFIG}) ...", file=sys.stderr)
        base = build_base(workdir / "base", args.timeout)
    runs = measure(args, base, workdir)
    results = summarise(args, runs)
    load_after = os.getloadavg()
    summary = {
        "date": started.isoformat(timespec="seconds"),
        "base": str(base),
        "base_built": args.base is None,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_1min": [round(load_before[0], 1), round(load_after[0], 1)],
        "variants": results,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print_table(
        results,
        f"{summary['date']}: {args.repeats} rounds x {args.steps} steps ({args.warmup} "
        f"dropped per run), base {base}{' (built here)' if summary['base_built'] else ''}; "
        f"Python {summary['python']}, {summary['cpus']} CPUs, load average "
        f"{load_before[0]:.1f} at start, {load_after[0]:.1f} at end",
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.workdir:
            return run(args, Path(args.workdir).resolve())
        with tempfile.TemporaryDirectory(prefix="bench_post_training_") as folder:
            return run(args, Path(folder))
    except RuntimeError as exc:  # a training run failed
        print(f"bench_post_training: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
