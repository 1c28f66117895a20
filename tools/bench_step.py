#!/usr/bin/env python
"""Step time of ``MM1Model`` on text-only batches vs a plain Megatron-Core ``GPTModel``.

Both models share the language-model config, weights layout, batch, mask and loss; the
only difference is MM1Model's wrapper (embedding merge path, vision tower present but
idle). Timings interleave the two models so machine noise hits both alike.

    python tools/bench_step.py --config configs/debug.yaml --steps 20
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("bench_step")


def _step(model, optimizer, batch, forward) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    per_token_loss = forward(model, batch)
    loss = (per_token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()

    from megatron.core.models.gpt import GPTModel

    from mm1_megatron.batch import model_inputs, run_model
    from mm1_megatron.config import ParallelConfig, load_config, validate_config
    from mm1_megatron.data import SyntheticTokenizer
    from mm1_megatron.data.build import build_run_data
    from mm1_megatron.models import RuntimeOptions, build_mm1_model
    from mm1_megatron.models.specs import language_block_spec
    from mm1_megatron.models.transformer_configs import language_transformer_config
    from mm1_megatron.parallel import init_distributed, seed_everything, shutdown_distributed

    cfg = validate_config(load_config(args.config, args.overrides))
    cfg.data.mixture = {"text": 1.0}
    init_distributed(ParallelConfig())
    tokenizer = SyntheticTokenizer()
    seed_everything(cfg.training.seed)
    mm1 = build_mm1_model(cfg.model, cfg.parallel, image_token_id=tokenizer.image_token_id)
    seed_everything(cfg.training.seed)
    lm_config = language_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
    gpt = GPTModel(
        lm_config,
        language_block_spec(lm_config, cfg.model.transformer_impl, attention=cfg.model.attention),
        vocab_size=cfg.model.llm.vocab_size,
        max_sequence_length=cfg.model.llm.max_sequence_length,
        share_embeddings_and_output_weights=cfg.model.llm.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.model.llm.rotary_base,
    )

    data, _ = build_run_data(cfg)
    batch = model_inputs(next(data), torch.device("cpu"))

    def run_mm1(model, b):
        return run_model(model, b)

    def run_gpt(model, b):
        return model(b["tokens"], b["position_ids"], b["document_ids"], labels=b["labels"])

    contenders = {
        "GPTModel (Megatron-Core)": (gpt, torch.optim.AdamW(gpt.parameters(), lr=1e-4), run_gpt),
        "MM1Model (text-only)": (mm1, torch.optim.AdamW(mm1.parameters(), lr=1e-4), run_mm1),
    }
    times = {name: [] for name in contenders}
    for step in range(args.warmup + args.steps):
        for name, (model, optimizer, forward) in contenders.items():
            seconds = _step(model, optimizer, batch, forward)
            if step >= args.warmup:
                times[name].append(seconds)
    base = statistics.median(times["GPTModel (Megatron-Core)"])
    tokens = cfg.training.micro_batch_size * cfg.training.seq_length
    logger.info(
        "config %s: micro-batch %d x %d tokens, %d timed steps, torch threads %d",
        args.config,
        cfg.training.micro_batch_size,
        cfg.training.seq_length,
        args.steps,
        torch.get_num_threads(),
    )
    logger.info("%-26s %12s %12s %8s", "model", "median ms", "tokens/s", "ratio")
    for name, samples in times.items():
        median = statistics.median(samples)
        logger.info("%-26s %12.1f %12.0f %8.3f", name, median * 1e3, tokens / median, median / base)
    shutdown_distributed()


if __name__ == "__main__":
    main()
