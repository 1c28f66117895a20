"""``bench_generate.py --against transformers``: our cached greedy generation against
``transformers``' ``generate()`` on our own export of the same model.

The model is built (random weights, the run's seed), saved as a checkpoint, exported to
the MM1 Hugging Face format (``mm1_megatron.conversion``) in a temporary folder and loaded
back with ``AutoModelForImageTextToText(trust_remote_code=True)``: the folder's own copy of
the modelling code, as a user of the export would load it. Both sides then generate the
same ``--new-tokens`` tokens, greedily, from the same prompts (text and images), with no
stop token and the image and padding tokens banned (ours: ``banned_token_ids``,
transformers: ``suppress_tokens``). Batch 1 is one prompt; batch 8 is 8 different prompts
of the same length, so no padding on either side.

The two alternate (ours, theirs, ours, ...) after one warm-up of each, in one process,
so machine noise hits both alike; each reports median, min and max seconds over
``--repeats`` whole generations, and the ratio of the medians' tokens/s.

Without CUDA every torch call of this process, transformers' too, passes through our CPU
stand-in's ``TorchFunctionMode`` (``mm1_megatron/compat/cpu.py``). By default both sides
run under it, as they do in one process; ``--transformers-outside-cpu-mode`` runs
transformers without it, as in a process that never imported ``mm1_megatron``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

logger = logging.getLogger("bench_generate")


def add_arguments(parser) -> None:
    parser.add_argument(
        "--against",
        choices=("recompute", "transformers"),
        default="recompute",
        help="compare the cached generation with recomputing, or with transformers' generate()",
    )
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[1, 8],
        help="--against transformers: prompts per generation, comma-separated",
    )
    parser.add_argument(
        "--transformers-outside-cpu-mode",
        action="store_true",
        help="--against transformers: run transformers without our CPU stand-in's "
        "TorchFunctionMode (compat/cpu.py), as in a process without mm1_megatron",
    )


def mcore_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def export_model(model, cfg, folder: Path) -> Path:
    """``model`` saved as a one-step checkpoint, then exported as an MM1 HF folder."""
    from mm1_megatron.config import save_config
    from mm1_megatron.config.schema import MODEL_PARTS
    from mm1_megatron.conversion import ExportRequest, export_checkpoint, megatron_io

    checkpoint = folder / "checkpoint"
    step = checkpoint / "step_00000000"
    megatron_io.save_parts(model, step, MODEL_PARTS)
    save_config(cfg, step / "config.yaml")
    megatron_io.write_published_checkpoint(checkpoint, step.name)
    return export_checkpoint(ExportRequest(checkpoint=checkpoint, output=folder / "hf"))


def load_transformers(folder: Path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(folder), trust_remote_code=True)
    return model.eval()


def outside_cpu_mode():
    """Our CPU stand-in's ``TorchFunctionMode`` off for the block (where it is on)."""
    import torch

    from mm1_megatron.compat.cpu import cpu_execution_enabled

    if not cpu_execution_enabled():
        return contextlib.nullcontext()
    return torch.overrides._pop_mode_temporarily()  # the stand-in's mode: the only one


def transformers_greedy(
    model, prompts, new_tokens: int, banned: Sequence[int], pad: int, *, plain: bool = False
):
    """``generate()`` greedy with its KV cache: exactly ``new_tokens`` per prompt; with
    ``plain``, outside our CPU stand-in's mode."""
    import torch

    input_ids = torch.tensor([p.token_ids for p in prompts])
    pixel_values = torch.cat([p.images for p in prompts])
    with torch.no_grad(), outside_cpu_mode() if plain else contextlib.nullcontext():
        out = model.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,  # no stop token, as on our side
            pad_token_id=pad,
            suppress_tokens=list(banned),
        )
    return out[:, input_ids.shape[1] :].tolist()


def _alternate(methods: Dict[str, Callable], repeats: int, label: str):
    """Warm-up of each, then ``repeats`` rounds of each in turn: outputs and seconds."""
    outputs = {name: fn() for name, fn in methods.items()}
    samples: Dict[str, List[float]] = {name: [] for name in methods}
    for repeat in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            tokens = fn()
            samples[name].append(time.perf_counter() - start)
            if tokens != outputs[name]:
                raise SystemExit(f"{label}/{name}: repeat {repeat + 1} gave other tokens")
            logger.info("%s %-12s repeat %d: %.3f s", label, name, repeat + 1, samples[name][-1])
    return outputs, samples


def _figures(seconds: List[float], tokens: int) -> dict:
    median = statistics.median(seconds)
    return {
        "tokens": tokens,
        "median_s": median,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "n": len(seconds),
        "tokens_per_s": tokens / median,
        "samples": seconds,
    }


def measure_batch(model, hf_model, prompts, tokenizer, args) -> dict:
    from mm1_megatron.inference import GenerationConfig, generate

    banned = (tokenizer.image_token_id, tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    config = GenerationConfig(
        max_new_tokens=args.new_tokens, stop_token_ids=(), banned_token_ids=banned
    )
    methods = {
        "ours": lambda: generate(model, prompts, config, pad_token_id=pad),
        "transformers": lambda: transformers_greedy(
            hf_model,
            prompts,
            args.new_tokens,
            banned,
            pad,
            plain=args.transformers_outside_cpu_mode,
        ),
    }
    label = f"batch {len(prompts)}"
    outputs, samples = _alternate(methods, args.repeats, label)
    total = len(prompts) * args.new_tokens
    result = {name: _figures(samples[name], total) for name in methods}
    result["tokens_identical"] = outputs["ours"] == outputs["transformers"]
    result["generated_per_prompt"] = {
        name: sorted({len(row) for row in rows}) for name, rows in outputs.items()
    }
    result["ratio"] = result["ours"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    return result


def run_against_transformers(cfg, tokenizer, args, build_prompt) -> dict:
    """Every batch size's figures for the model ``cfg`` describes."""
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import seed_everything

    seed_everything(cfg.training.seed)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=tokenizer.image_token_id)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        hf_model = load_transformers(export_model(model, cfg, Path(tmp)))
    seed = cfg.training.seed
    prompts = [
        build_prompt(cfg, tokenizer, args.prompt_tokens, args.images, seed + i)
        for i in range(max(args.batch_sizes))
    ]
    results = {}
    for batch in args.batch_sizes:
        results[str(batch)] = measure_batch(model, hf_model, prompts[:batch], tokenizer, args)
    return results


def report_against_transformers(results: dict, args) -> None:
    """The tables, then one JSON line with every figure."""
    import torch
    import transformers

    for name, result in results.items():
        logger.info("%s:", name)
        log_table(result)
    summary = {
        "against": "transformers",
        "transformers_outside_cpu_mode": args.transformers_outside_cpu_mode,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "images": args.images,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "megatron_core": mcore_version(),
            "transformers": transformers.__version__,
        },
        "results": results,
        "all_tokens_identical": all(
            batch["tokens_identical"] for size in results.values() for batch in size.values()
        ),
    }
    print(json.dumps(summary), flush=True)


def log_table(results: dict) -> None:
    logger.info(
        "%-6s %-13s %9s %8s %8s %3s %9s %6s %9s",
        *"batch side median_s min_s max_s N tokens/s ratio identical".split(),
    )
    for batch, result in results.items():
        for side in ("ours", "transformers"):
            f = result[side]
            ratio = f"{result['ratio']:.2f}x" if side == "ours" else "1.00x"
            logger.info(
                "%-6s %-13s %9.3f %8.3f %8.3f %3d %9.1f %6s %9s",
                batch,
                side,
                f["median_s"],
                f["min_s"],
                f["max_s"],
                f["n"],
                f["tokens_per_s"],
                ratio,
                result["tokens_identical"],
            )
