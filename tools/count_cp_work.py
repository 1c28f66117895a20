#!/usr/bin/env python
"""How evenly context parallelism splits a micro-batch's work: counted, not timed.

For micro-batches packed by the configured data pipeline (synthetic by default; any
``data.*`` override), per context-parallel size, per rank:

- attention: the causal (query, key) pairs of its queries, each query seeing its own
  document up to itself, under the whole-row split training uses (chunks ``r`` and
  ``2CP-1-r`` of the row, ``batch.context_parallel.row_shard``) and under the per-document
  split (each document padded to a multiple of ``2 x CP`` and cut alike,
  ``rank_positions``; its padding is counted as extra tokens);
- images: how many images the busiest rank encodes (those with a token in its share,
  ``local_image_tokens``) over the micro-batch's images (what encoding all of them on
  every rank costs each rank), and how often each image is encoded over the CP group
  (1.0: once; an image cut by a chunk boundary twice).

Printed per CP size: the busiest rank over the mean, ``max / mean`` (1.0: even), median /
min / max over rows; the image figures over micro-batches; the per-document split's
padding. The last line is one JSON object of all the figures.

    python tools/count_cp_work.py --config configs/debug.yaml training.seq_length=4096
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from typing import Dict, List

import torch

from mm1_megatron.batch.context_parallel import (
    all_rank_positions,
    local_image_tokens,
    padded_document_lengths,
    row_shard,
)
from mm1_megatron.batch.documents import compute_segments
from mm1_megatron.config import load_config, validate_config
from mm1_megatron.data.build import build_run_data


def causal_pairs(positions: torch.Tensor, starts: torch.Tensor) -> int:
    """Keys the queries at ``positions`` see: each from its document's start to itself."""
    return int((positions - starts[positions] + 1).sum())


def document_starts(spans) -> torch.Tensor:
    """Per position of a row, the start of its document."""
    starts = torch.empty(spans[-1][1], dtype=torch.long)
    for start, end in spans:
        starts[start:end] = start
    return starts


def row_split_work(spans, cp: int) -> List[int]:
    starts = document_starts(spans)
    seq_length = spans[-1][1]
    return [causal_pairs(row_shard(seq_length, cp, r).positions, starts) for r in range(cp)]


def document_split_work(spans, cp: int):
    """Per rank pairs under the per-document split, and the padding it adds."""
    lengths = [end - start for start, end in spans]
    padded = padded_document_lengths(lengths, cp)
    bounds, start = [], 0
    for length in padded:
        bounds.append((start, start + length))
        start += length
    starts = document_starts(bounds)
    work = [causal_pairs(p, starts) for p in all_rank_positions(padded, cp)]
    return work, sum(padded) - sum(lengths)


def imbalance(work: List[int]) -> float:
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


def summary(values: List[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def measure(cfg, cp_sizes: List[int], num_batches: int) -> Dict[str, Dict]:
    loader, tokenizer = build_run_data(cfg)
    per_token = cfg.model.connector.num_output_tokens
    names = ("row", "document", "padding", "busiest_rank_images", "encodings_per_image")
    figures = {cp: {name: [] for name in names} for cp in cp_sizes}
    for _ in range(num_batches):
        batch = next(loader)
        tokens, seq_length = batch["tokens"], batch["tokens"].shape[1]
        num_images = int((tokens == tokenizer.image_token_id).sum()) // per_token
        for spans in compute_segments(batch["document_ids"]):
            for cp in cp_sizes:
                figures[cp]["row"].append(imbalance(row_split_work(spans, cp)))
                work, padding = document_split_work(spans, cp)
                figures[cp]["document"].append(imbalance(work))
                figures[cp]["padding"].append(padding / seq_length)
        for cp in cp_sizes:
            if num_images == 0:
                continue
            encoded = [
                local_image_tokens(
                    tokens,
                    row_shard(seq_length, cp, rank).positions,
                    image_token_id=tokenizer.image_token_id,
                    tokens_per_image=per_token,
                ).images.numel()
                for rank in range(cp)
            ]
            figures[cp]["busiest_rank_images"].append(max(encoded) / num_images)
            figures[cp]["encodings_per_image"].append(sum(encoded) / num_images)
    return {
        cp: {name: summary(values) for name, values in parts.items() if values}
        for cp, parts in figures.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cfg = validate_config(load_config(args.config, args.overrides))
    results = measure(cfg, args.cp, args.batches)
    print(f"{args.config} {' '.join(args.overrides)}: seq_length {cfg.training.seq_length}")
    for cp, parts in results.items():
        row, document = parts["row"], parts["document"]
        line = (
            f"CP={cp}: attention max/mean whole-row {row['median']:.3f} "
            f"[{row['min']:.3f}, {row['max']:.3f}], per-document {document['median']:.3f} "
            f"[{document['min']:.3f}, {document['max']:.3f}] (+{parts['padding']['median']:.1%} "
            f"padding), N={row['n']} rows"
        )
        if "busiest_rank_images" in parts:
            busiest, encodings = parts["busiest_rank_images"], parts["encodings_per_image"]
            line += (
                f"; images: the busiest rank encodes {busiest['median']:.3f} "
                f"[{busiest['min']:.3f}, {busiest['max']:.3f}] of the micro-batch's (all on "
                f"every rank: 1.0), each image encoded {encodings['median']:.3f} "
                f"[{encodings['min']:.3f}, {encodings['max']:.3f}] times (all: {cp})"
            )
        print(line)
    print(json.dumps({str(cp): parts for cp, parts in results.items()}))


if __name__ == "__main__":
    main()
