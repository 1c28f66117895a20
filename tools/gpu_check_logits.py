#!/usr/bin/env python
"""Logits of one training checkpoint under several model settings, and optionally of its
Hugging Face export, on one fixed prompt (an image and a sentence). A helper of
``tools/gpu_check.py``, run in a process of its own:

    python tools/gpu_check_logits.py --checkpoint CKPT --output out.pt \\
        --variant te= --variant local=model.transformer_impl=local [--hf EXPORT]

Each ``--variant NAME=OVERRIDES`` (``;``-separated, applied to the checkpoint's own
config) is built as ``mm1 eval`` builds it (bf16 on CUDA unless the checkpoint trained in
fp32) and loads the checkpoint's weights. The export runs in fp32 on the CPU. Writes
``{"tokens", "image_token_id", "logits": {name: [b, s, V] fp32}, "modules": {name:
[class names]}}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

SENTENCE = "the picture shows a red circle on a white background . it is"
# Class names that show which implementation a model runs.
REPORTED = ("TE", "DocumentAttention", "DenseMaskAttention", "GroupedMLP", "SequentialMLP")


def prompt(cfg, tokenizer):
    """``[1, s]`` tokens (bos, the image's placeholders, the sentence) and ``[1, 3, H, W]``."""
    placeholders = [tokenizer.image_token_id] * cfg.model.connector.num_output_tokens
    tokens = [tokenizer.bos_token_id, *placeholders, *tokenizer.encode(SENTENCE)]
    size = cfg.model.vision.image_size
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return torch.tensor([tokens]), images


def module_classes(model) -> list:
    names = {type(module).__name__ for module in model.modules()}
    return sorted(name for name in names if any(part in name for part in REPORTED))


def ours(checkpoint: Path, variants: dict) -> dict:
    from mm1_megatron.checkpoint import load_model_weights, resolve_checkpoint
    from mm1_megatron.data.tokenizers.text import build_tokenizer
    from mm1_megatron.evaluation.model import checkpoint_config
    from mm1_megatron.models import RuntimeOptions, build_mm1_model
    from mm1_megatron.parallel import init_distributed, seed_everything

    folder = resolve_checkpoint(checkpoint)
    results, ctx = {"logits": {}, "modules": {}}, None
    for name, overrides in variants.items():
        cfg = checkpoint_config(folder, overrides)
        if ctx is None:
            ctx = init_distributed(cfg.parallel)
        seed_everything(cfg.training.seed)
        tokenizer = build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
        cuda = ctx.device.type == "cuda"
        bf16 = cuda and cfg.training.precision in ("auto", "bf16")
        dtype = torch.bfloat16 if bf16 else torch.float32
        runtime = RuntimeOptions(params_dtype=dtype, use_cpu_initialization=not cuda)
        model = build_mm1_model(
            cfg.model, cfg.parallel, image_token_id=tokenizer.image_token_id, runtime=runtime
        )
        model.to(ctx.device)
        load_model_weights(model, folder)
        model.eval()
        tokens, images = prompt(cfg, tokenizer)
        tokens = tokens.to(ctx.device)
        positions = torch.arange(tokens.shape[1], device=ctx.device).expand_as(tokens)
        with torch.no_grad():
            logits = model(
                tokens, positions, torch.zeros_like(tokens), images=images.to(ctx.device, dtype)
            )
        results["logits"][name] = logits.float().cpu()
        results["modules"][name] = module_classes(model)
        results["tokens"] = tokens.cpu()
        results["image_token_id"] = tokenizer.image_token_id
        del model
    return results


def exported(folder: Path, tokens: torch.Tensor, checkpoint: Path) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"
    from mm1_megatron.data.tokenizers.text import build_tokenizer
    from mm1_megatron.evaluation.model import checkpoint_config

    cfg = checkpoint_config(checkpoint)
    _, images = prompt(cfg, build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens, pixel_values=images).logits.float()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE;...")
    parser.add_argument("--hf", type=Path, help="the checkpoint's Hugging Face export")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    variants = {}
    for item in args.variant:
        name, _, overrides = item.partition("=")
        variants[name] = [text for text in overrides.split(";") if text]
    results = ours(args.checkpoint, variants)
    if args.hf is not None:
        results["logits"]["hf"] = exported(args.hf, results["tokens"], args.checkpoint)
    torch.save(results, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
