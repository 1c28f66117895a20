#!/usr/bin/env python
"""Training-step time on text-only batches, against what a user would otherwise run.

``--against gpt`` (default): ``MM1Model`` vs a plain Megatron-Core ``GPTModel``. Both share
the language-model config, batch, mask and loss; the only difference is MM1Model's
wrapper (embedding merge path, vision tower present but idle).

``--against transformers``: our whole ``Trainer.train_step`` (Megatron-Core schedule, DDP
buffers, optimizer wrapper with gradient clipping, scheduler, metrics) vs a plain loop
on ``transformers.LlamaForCausalLM`` of the same shape (SDPA attention, causal over the
whole row: it does not separate the packed documents), ``torch.optim.AdamW``, mean
cross-entropy, on the very same token batches. Ours attends within each document only,
so it does less attention work.

Timings interleave the two so machine noise hits both alike; each figure is the median,
min and max over ``--steps`` timed steps after ``--warmup``.

    python tools/bench_step.py --config configs/debug.yaml --steps 20
    python tools/bench_step.py --against transformers --steps 6 model.llm.hidden_size=512 \
        model.llm.ffn_hidden_size=1536 model.llm.num_attention_heads=8 \
        model.llm.num_query_groups=4 model.llm.num_layers=8 training.seq_length=1024 \
        model.llm.max_sequence_length=1024 training.micro_batch_size=2 \
        training.global_batch_size=2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm1_megatron.utils.logging_setup import setup_logging  # noqa: E402

logger = logging.getLogger("bench_step")


def _step(model, optimizer, batch, forward) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    per_token_loss = forward(model, batch)
    loss = (per_token_loss * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


class _Predrawn:
    """The trainer's loader with every batch drawn up front (so neither loop's time holds
    data generation), keeping the host batches it hands out for the other loop."""

    def __init__(self, loader, count: int):
        self.loader, self.taken = loader, []
        self._batches = iter([next(loader) for _ in range(count)])

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self._batches)
        self.taken.append(batch)
        return batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _llama_like(cfg):
    """``LlamaForCausalLM`` of the language model's shape (SDPA attention, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = cfg.model.llm
    config = LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_query_groups or llm.num_attention_heads,
        max_position_embeddings=llm.max_sequence_length,
        rope_theta=float(llm.rotary_base),
        rms_norm_eps=llm.norm_epsilon,
        tie_word_embeddings=llm.tie_embeddings,
        attention_bias=False,
    )
    torch.manual_seed(cfg.training.seed)
    return LlamaForCausalLM(config).to(torch.float32).train()


def _plain_step(model, optimizer, batches) -> None:
    """What a user writes: forward, masked mean cross-entropy, backward, AdamW."""
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        logits = model(input_ids=batch["tokens"]).logits
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
        )
        mask = batch["loss_mask"].flatten().float()
        ((per_token * mask).sum() / mask.sum() / len(batches)).backward()
    optimizer.step()


def _spread(samples) -> str:
    return (
        f"{statistics.median(samples) * 1e3:9.1f} ms ({min(samples) * 1e3:.1f}-"
        f"{max(samples) * 1e3:.1f}), N={len(samples)}"
    )


def _documents_per_row(batches) -> float:
    from mm1_megatron.batch.documents import compute_segments

    rows = [spans for batch in batches for spans in compute_segments(batch["document_ids"])]
    return sum(len(spans) for spans in rows) / len(rows)


def against_transformers(cfg, *, steps: int, warmup: int) -> None:
    """``Trainer.train_step`` and the plain loop, alternating, on the same batches."""
    import tempfile

    from mm1_megatron.parallel import shutdown_distributed
    from mm1_megatron.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as output:
        cfg.logging.output_dir = output
        cfg.checkpoint.save_dir = None
        trainer = Trainer(cfg)
        trainer.data = _Predrawn(trainer.data, (warmup + steps) * trainer.num_microbatches)
        plain = _llama_like(cfg)
        optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-4)
        times = {"ours": [], "plain": []}
        for step in range(warmup + steps):
            start = time.perf_counter()
            trainer.train_step()
            middle = time.perf_counter()
            _plain_step(plain, optimizer, trainer.data.taken)
            end = time.perf_counter()
            micro_batches, trainer.data.taken = trainer.data.taken, []
            if step >= warmup:
                times["ours"].append(middle - start)
                times["plain"].append(end - middle)
        shutdown_distributed()
    ratios = [a / b for a, b in zip(times["ours"], times["plain"])]
    logger.info(
        "micro-batch %d x %d tokens, %d micro-batches per step, %.1f documents per row, "
        "torch threads %d",
        cfg.training.micro_batch_size,
        cfg.training.seq_length,
        len(micro_batches),
        _documents_per_row(micro_batches),
        torch.get_num_threads(),
    )
    logger.info("Trainer.train_step            %s", _spread(times["ours"]))
    logger.info("plain transformers AdamW loop %s", _spread(times["plain"]))
    ratio = statistics.median(times["ours"]) / statistics.median(times["plain"])
    logger.info(
        "ratio ours / plain: median of medians %.3f; per-step ratios %.3f (%.3f-%.3f)",
        ratio,
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )
    summary = {name: _figures(samples) for name, samples in times.items()}
    summary.update(ratio=ratio, per_step_ratio=_figures(ratios))
    print(json.dumps(summary), flush=True)


def _figures(samples) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--against", choices=("gpt", "transformers"), default="gpt")
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
    if args.against == "transformers":
        against_transformers(cfg, steps=args.steps, warmup=args.warmup)
        return
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
