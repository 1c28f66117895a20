#!/usr/bin/env python
"""Greedy generation on CPU: with the KV cache vs the whole sequence recomputed per token.

Side by side in one run, for each model size: a prompt of ``--prompt-tokens`` tokens with
``--images`` images interleaved (each image expanded to the connector's tokens), then
``--new-tokens`` tokens decoded greedily, with no stop token, two ways:

- cached: ``mm1_megatron.inference.generate``, one prefill that fills Megatron-Core's
  static KV cache, then one token per step (the prefill is also timed alone: a
  generation of one token);
- recompute: the model run on prompt + tokens so far (images encoded again each time),
  the argmax of the last position appended; no cache.

Both must produce the same tokens; the run says whether they do. The time of each is the
median over ``--repeats`` whole generations after one warm-up of each, the two methods
alternating so machine noise hits both alike. By default two sizes run: the debug model
(``configs/debug.yaml``: LLM 128 wide x 4 layers) and a wider one (512 x 8); ``--hidden``
and ``--layers`` pick one size instead. The last line printed is one JSON object with
the figures.

With ``--against transformers`` the cached generation is compared instead with
``transformers``' ``generate()`` on our export of the same model, at batch 1 and 8 (see
``tools/bench_generate_transformers.py``); by default at the wide size only.

    python tools/bench_generate.py                           # a few minutes on 2 cores
    python tools/bench_generate.py --hidden 512 --layers 8   # one size
    python tools/bench_generate.py --tiny                    # seconds: a smoke test
    python tools/bench_generate.py --against transformers --repeats 5
    python tools/bench_generate.py --against transformers --tiny
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_generate_transformers import (  # noqa: E402
    add_arguments,
    mcore_version,
    report_against_transformers,
    run_against_transformers,
)

logger = logging.getLogger("bench_generate")

# name -> (LLM hidden size, LLM layers); None keeps the config's value (configs/debug.yaml:
# 128 wide, 4 layers).
DEFAULT_SIZES = {"debug": (None, None), "wide": (512, 8)}
# configs/debug.yaml shrunk so that a model builds and runs in milliseconds.
TINY_OVERRIDES = (
    "model.vision.hidden_size=32",
    "model.vision.num_layers=1",
    "model.vision.num_attention_heads=2",
    "model.vision.ffn_hidden_size=64",
    "model.connector.hidden_size=32",
    "model.llm.hidden_size=32",
    "model.llm.num_layers=2",
    "model.llm.num_attention_heads=4",
    "model.llm.num_query_groups=2",
    "model.llm.ffn_hidden_size=64",
)
TINY_RUN = dict(prompt_tokens=48, new_tokens=8, images=1, repeats=1)


def size_overrides(hidden: Optional[int], layers: Optional[int]) -> List[str]:
    """LLM width and depth; heads of 64 channels (at least 4), half as many KV groups,
    an MLP 3x as wide (the debug config's proportions at 128 wide)."""
    overrides = []
    if hidden is not None:
        heads = max(4, hidden // 64)
        overrides += [
            f"model.llm.hidden_size={hidden}",
            f"model.llm.ffn_hidden_size={3 * hidden}",
            f"model.llm.num_attention_heads={heads}",
            f"model.llm.num_query_groups={heads // 2}",
        ]
    if layers is not None:
        overrides.append(f"model.llm.num_layers={layers}")
    return overrides


def build_prompt(cfg, tokenizer, length: int, num_images: int, seed: int):
    """``length`` tokens: bos, then each image's tokens followed by a run of random words
    (the model is untrained, so any words do); the images are synthetic scenes."""
    import numpy as np
    import torch

    from mm1_megatron.batch import expand_image_placeholders
    from mm1_megatron.data.synthetic.world import draw_scene, random_scene
    from mm1_megatron.data.tokenizers.base import SPECIAL_TOKENS
    from mm1_megatron.inference import Prompt

    per_image = cfg.model.connector.num_output_tokens
    text = length - 1 - num_images * per_image
    if text < 0:
        raise SystemExit(f"{num_images} images of {per_image} tokens do not fit {length} tokens")
    rng = np.random.default_rng(seed)
    words = np.arange(len(SPECIAL_TOKENS), tokenizer.vocab_size)
    bounds = np.linspace(0, text, num_images + 1).astype(int)
    ids = [tokenizer.bos_token_id]
    for i in range(num_images):
        ids += [tokenizer.image_token_id] + rng.choice(words, bounds[i + 1] - bounds[i]).tolist()
    ids = expand_image_placeholders(
        ids, image_token_id=tokenizer.image_token_id, num_image_tokens=per_image
    )
    assert len(ids) == length, (len(ids), length)
    size = cfg.model.vision.image_size
    images = torch.stack([draw_scene(random_scene(rng), size) for _ in range(num_images)])
    return Prompt(token_ids=ids, images=images)


def recompute_greedy(model, prompt, max_new_tokens: int, banned: Sequence[int]) -> List[int]:
    """No cache: the model on prompt + tokens so far, argmax of the last position."""
    import torch

    from mm1_megatron.batch import run_model

    ids = list(prompt.token_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tokens = torch.tensor([ids])
            inputs = {
                "tokens": tokens,
                "position_ids": torch.arange(len(ids))[None],
                "document_ids": torch.zeros_like(tokens),
                "images": prompt.images,
            }
            logits = run_model(model, inputs, with_labels=False)[0, -1].clone()
            logits[list(banned)] = float("-inf")
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
    return out


def _timed(fn: Callable[[], List[int]]):
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def measure_size(name: str, cfg, tokenizer, args) -> dict:
    from mm1_megatron.inference import GenerationConfig, generate
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import seed_everything

    seed_everything(cfg.training.seed)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=tokenizer.image_token_id)
    model.eval()
    prompt = build_prompt(cfg, tokenizer, args.prompt_tokens, args.images, cfg.training.seed)
    banned = (tokenizer.image_token_id, tokenizer.pad_token_id)
    config = GenerationConfig(
        max_new_tokens=args.new_tokens, stop_token_ids=(), banned_token_ids=banned
    )

    def cached() -> List[int]:
        return generate(model, [prompt], config, pad_token_id=tokenizer.pad_token_id)[0]

    def recompute() -> List[int]:
        return recompute_greedy(model, prompt, args.new_tokens, banned)

    def prefill() -> List[int]:  # the cached run's first token: prompt and images encoded
        first = GenerationConfig(max_new_tokens=1, stop_token_ids=(), banned_token_ids=banned)
        return generate(model, [prompt], first, pad_token_id=tokenizer.pad_token_id)[0]

    methods = {"cached": cached, "recompute": recompute, "cached_prefill": prefill}
    llm = cfg.model.llm
    parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "%s: LLM %d wide x %d layers, %d parameters; warm-up",
        name,
        llm.hidden_size,
        llm.num_layers,
        parameters,
    )
    outputs = {method: fn() for method, fn in methods.items()}  # warm-up
    samples: Dict[str, List[float]] = {method: [] for method in methods}
    for repeat in range(args.repeats):
        for method, fn in methods.items():
            seconds, tokens = _timed(fn)
            if tokens != outputs[method]:
                raise SystemExit(f"{name}/{method}: repeat {repeat} gave other tokens")
            samples[method].append(seconds)
            logger.info("%s %-14s repeat %d: %.3f s", name, method, repeat + 1, seconds)
    ours, reference = outputs["cached"], outputs["recompute"]
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), None)
    if mismatch is None and len(ours) != len(reference):
        mismatch = min(len(ours), len(reference))
    result = {
        "llm_hidden_size": llm.hidden_size,
        "llm_num_layers": llm.num_layers,
        "parameters": parameters,
        "generated_tokens": {method: len(outputs[method]) for method in ("cached", "recompute")},
        "tokens_match": mismatch is None,
        "first_mismatch": mismatch,
    }
    for method in ("cached", "recompute"):
        median = statistics.median(samples[method])
        result[method] = {
            "seconds": median,
            "tokens_per_s": len(outputs[method]) / median,
            "samples": samples[method],
        }
    # The cached run split: prefill (prompt + images, first token), then one step a token.
    result["cached"]["prefill_seconds"] = statistics.median(samples["cached_prefill"])
    steps = len(ours) - 1
    decode = result["cached"]["seconds"] - result["cached"]["prefill_seconds"]
    result["cached"]["decode_ms_per_token"] = 1e3 * decode / steps if steps else None
    result["speedup"] = result["recompute"]["seconds"] / result["cached"]["seconds"]
    return result


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--tiny", action="store_true", help="tiny model and run: checks the script")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=2, help="images in the prompt (>= 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, after warm-up")
    parser.add_argument("--hidden", type=int, help="LLM width: measure this one size only")
    parser.add_argument("--layers", type=int, help="LLM layers: measure this one size only")
    add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="config overrides, for every size")
    args = parser.parse_args()
    if args.tiny:
        for key, value in TINY_RUN.items():
            setattr(args, key, value)
    if args.images < 1:
        parser.error("--images must be at least 1")
    return args


def main() -> None:
    args = _arguments()
    import torch

    from mm1_megatron.utils.logging_setup import setup_logging

    setup_logging()

    from mm1_megatron.config import ParallelConfig, load_config, validate_config
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from mm1_megatron.parallel import init_distributed, shutdown_distributed

    if args.tiny:
        sizes = {"tiny": (None, None)}
    elif args.hidden is not None or args.layers is not None:
        sizes = {None: (args.hidden, args.layers)}  # named after its shape
    elif args.against == "transformers":
        sizes = {"wide": DEFAULT_SIZES["wide"]}
    else:
        sizes = DEFAULT_SIZES
    total = args.prompt_tokens + args.new_tokens
    base = (list(TINY_OVERRIDES) if args.tiny else []) + [
        f"model.llm.max_sequence_length={total}",
        f"training.seq_length={total}",
    ]
    init_distributed(ParallelConfig(), force_cpu=True)
    tokenizer = SyntheticTokenizer()
    logger.info(
        "prompt %d tokens (%d images), %d new tokens, greedy, no stop token; "
        "%d timed repeats; torch %s, megatron-core %s, %d threads",
        args.prompt_tokens,
        args.images,
        args.new_tokens,
        args.repeats,
        torch.__version__,
        mcore_version(),
        torch.get_num_threads(),
    )
    results = {}
    for name, (hidden, layers) in sizes.items():
        overrides = base + size_overrides(hidden, layers) + list(args.overrides)
        cfg = validate_config(load_config(args.config, overrides))
        name = name or f"{cfg.model.llm.hidden_size}x{cfg.model.llm.num_layers}"
        if args.against == "transformers":
            results[name] = run_against_transformers(cfg, tokenizer, args, build_prompt)
        else:
            results[name] = measure_size(name, cfg, tokenizer, args)
    shutdown_distributed()
    if args.against == "transformers":
        report_against_transformers(results, args)
    else:
        _report_against_recompute(results, args)


def _report_against_recompute(results: dict, args) -> None:
    import torch

    logger.info(
        "%-10s %-10s %10s %10s %9s %6s", *"size method median_s tokens/s speed-up match".split()
    )
    for name, result in results.items():
        for method in ("recompute", "cached"):
            figures = result[method]
            speedup = f"{result['speedup']:.1f}x" if method == "cached" else "1.0x"
            logger.info(
                "%-10s %-10s %10.3f %10.1f %9s %6s",
                name,
                method,
                figures["seconds"],
                figures["tokens_per_s"],
                speedup,
                result["tokens_match"],
            )
    for name, result in results.items():
        logger.info(
            "%s cached: prefill (prompt + images, first token) %.3f s, then %.1f ms a token",
            name,
            result["cached"]["prefill_seconds"],
            result["cached"]["decode_ms_per_token"] or 0.0,
        )
    summary = {
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "images": args.images,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "results": results,
        "all_tokens_match": all(r["tokens_match"] for r in results.values()),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
