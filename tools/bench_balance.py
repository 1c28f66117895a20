#!/usr/bin/env python
"""What balanced placement costs the data loader, per step, against the loader's own work.

For one data-parallel rank of ``--dp`` (simulated in this process), step by step:

- ``load``: what the rank's loader does without balancing, build its ``G / D`` sequences
  (``builder.sequence``: draw or decode, pack, normalise) and collate its micro-batches;
- ``plan``: what balancing adds on the rank: the costs of those same sequences
  (``builder.sequence_cost``, no pixels) and the assignment of the whole global batch
  (``balance.assign_global_batch``). The all-gather of the other ranks' cost rows is not
  timed (simulated ranks; it moves ``G x 4`` int64, 16 KiB for MM1's 512 sequences).
  Printed apart: the share of ``plan`` spent in the costs, the rest in the assignment
  (of the two medians).

The two alternate step by step, so machine noise hits both alike. Printed: median, min
and max seconds of each over ``--steps`` steps, and ``plan / load`` of the medians, for each
``--dp``. One torch thread (as in a loader worker).

``--shards`` measures the same on real-shaped data through the webdataset source
(``data.source=webdataset``, the MM1 mixture: 45% interleaved, 45% caption, 10% text)
instead of the synthetic world, whose images are drawn rather than decoded. It first
builds a small corpus with the project's own ``mm1 data`` commands, in a temporary folder
or ``--workdir`` (kept, and reused by a later run with the same corpus settings):

- caption shards (``mm1 data shards coco``): 640x480 JPEGs with COCO-like captions
  (``tools/bench_data.py``'s images and caption lengths);
- interleaved shards (``mm1 data shards interleaved``): documents of 1 to 16 JPEGs
  (uniform) between long texts (lognormal, median 1500 words);
- an indexed text corpus (``mm1 data text-index``; documents of median 800 words);
- the tokenizer: a small sentencepiece model trained on those texts (``mm1 data
  tokenizer``; nothing downloaded), or ``--tokenizer synthetic`` (the default where
  sentencepiece is not installed).

Texts are words of the synthetic vocabulary (one token each with either tokenizer), so
their lengths in tokens are the lengths drawn. Images are decoded with the configured
decoder (``data.images.decoder``, PIL by default). Epochs wrap: the corpus need not hold
``--steps`` global batches.

    python tools/bench_balance.py                          # mm1_30b, DP 4, 8 and 64
    python tools/bench_balance.py --config configs/debug.yaml --dp 2 --steps 3   # smoke
    python tools/bench_balance.py --shards --dp 8 64       # mm1_30b on shards
    python tools/bench_balance.py --shards --config configs/debug.yaml --dp 2 --steps 2 \\
        --jpegs 4 --caption-pairs 16 --documents 4 --text-documents 8   # smoke

The last line printed is one JSON object of all the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_data import coco_like_lengths, generated_jpegs  # noqa: E402

from mm1_megatron.config import load_config  # noqa: E402
from mm1_megatron.data import cli as data_cli  # noqa: E402
from mm1_megatron.data.build import build_run_data  # noqa: E402
from mm1_megatron.data.pipeline.balance import (  # noqa: E402
    assign_global_batch,
    integer_costs,
)
from mm1_megatron.data.pipeline.loader import collate  # noqa: E402
from mm1_megatron.data.pipeline.tiling import tile_size  # noqa: E402
from mm1_megatron.data.tokenizers.base import build_vocabulary  # noqa: E402
from mm1_megatron.data.tokenizers.text import build_tokenizer  # noqa: E402
from mm1_megatron.training.flops import balance_weights  # noqa: E402
from mm1_megatron.utils.logging_setup import setup_logging  # noqa: E402

MM1_MIXTURE = "{interleaved: 0.45, caption: 0.45, text: 0.10}"
CORPUS_VERSION = 1  # bump when the generated corpus changes, so a --workdir is rebuilt
TOKENIZER_VOCAB = 1000  # an upper bound: the texts' few words need far fewer pieces


def _stats(values: List[float]) -> Dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def measure(cfg, dp: int, steps: int, rank: int = 0) -> Dict[str, object]:
    builder = build_run_data(cfg)[0].builder
    t = cfg.training
    per_rank, b = t.global_batch_size // dp, t.micro_batch_size
    weights = balance_weights(cfg.model, tile_size(cfg.data.tiling))
    load, plan, costs, images = [], [], [], []
    for step in range(steps):
        first = step * t.global_batch_size
        own = [first + n * dp + rank for n in range(per_rank)]
        # The other ranks' rows, as the all-gather would deliver them (not timed).
        others = np.array(
            [builder.sequence_cost(first + i).as_row() for i in range(t.global_batch_size)]
        )
        started = time.perf_counter()
        mine = np.array([builder.sequence_cost(g).as_row() for g in own])
        costed = time.perf_counter()
        rows = others.copy()
        rows[rank::dp] = mine
        assign_global_batch(integer_costs(weights, rows), dp_size=dp, micro_batch_size=b)
        plan.append(time.perf_counter() - started)
        costs.append(costed - started)
        started = time.perf_counter()
        count = 0
        for k in range(0, per_rank, b):
            batch = collate([builder.sequence(g)[0] for g in own[k : k + b]])
            count += int(batch["num_images"].sum())
        load.append(time.perf_counter() - started)
        images.append(count)
    assign = [p - c for p, c in zip(plan, costs)]
    costs_median, assign_median = statistics.median(costs), statistics.median(assign)
    return {
        "dp": dp,
        "sequences_per_rank": per_rank,
        "load_s": _stats(load),
        "plan_s": _stats(plan),
        "plan_over_load": statistics.median(plan) / statistics.median(load),
        "plan_costs_s": _stats(costs),
        "plan_assign_s": _stats(assign),
        # Of the medians, as plan / load: one slow step does not decide it.
        "costs_share_of_plan": costs_median / (costs_median + assign_median),
        "images_per_step": _stats(images),
    }


# ---- --shards: a small real-shaped corpus, built with `mm1 data` ---------------------------

WORDS = [w for w in build_vocabulary() if not w.startswith("<") and w not in ".,:?"]


def _text(rng: np.random.Generator, words: int) -> str:
    """``words`` words of the synthetic vocabulary, in sentences of 6 to 17 words."""
    chosen = list(rng.choice(WORDS, size=max(int(words), 1)))
    out, until_stop = [], int(rng.integers(6, 18))
    for word in chosen[:-1]:
        out.append(word)
        until_stop -= 1
        if until_stop == 0:
            out.append(".")
            until_stop = int(rng.integers(6, 18))
    out.append(chosen[-1])
    return " ".join(out)


def _lognormal_words(rng: np.random.Generator, median: float, low: int, high: int) -> int:
    return int(np.clip(rng.lognormal(np.log(median), 0.6), low, high))


def _write_inputs(folder: Path, settings: Dict[str, object]) -> Dict[str, Path]:
    """JPEGs, a COCO captions file, interleaved JSONL and text JSONL: ``mm1 data``'s inputs."""
    rng = np.random.default_rng(int(settings["seed"]))
    images = folder / "inputs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = []
    for number, blob in enumerate(generated_jpegs(int(settings["jpegs"]), int(settings["seed"]))):
        names.append(f"{number:05d}.jpg")
        (images / names[-1]).write_bytes(blob)

    pairs = int(settings["caption_pairs"])
    lengths = coco_like_lengths(pairs, int(settings["seed"]))  # tokens with bos and eos
    coco = {
        "images": [
            {"id": i, "file_name": names[i % len(names)], "width": 640, "height": 480}
            for i in range(pairs)
        ],
        "annotations": [
            {"id": i, "image_id": i, "caption": " ".join(rng.choice(WORDS, size=int(n) - 2))}
            for i, n in enumerate(lengths)
        ],
    }
    captions = folder / "inputs" / "captions.json"
    captions.write_text(json.dumps(coco))

    documents = folder / "inputs" / "interleaved.jsonl"
    image_number = 0
    with open(documents, "w") as file:
        for _ in range(int(settings["documents"])):
            count = int(rng.integers(1, 17))
            words = _lognormal_words(rng, 1500, count + 1, 8000)
            cuts = np.sort(rng.choice(np.arange(1, words), size=count, replace=False))
            parts = np.diff(np.concatenate([[0], cuts, [words]]))
            segments = [{"text": _text(rng, parts[0])}]
            for part in parts[1:]:
                segments.append({"image": names[image_number % len(names)]})
                segments.append({"text": _text(rng, part)})
                image_number += 1
            file.write(json.dumps({"segments": segments}) + "\n")

    texts = folder / "inputs" / "text.jsonl"
    with open(texts, "w") as file:
        for _ in range(int(settings["text_documents"])):
            file.write(json.dumps({"text": _text(rng, _lognormal_words(rng, 800, 50, 8000))}))
            file.write("\n")
    return {"images": images, "captions": captions, "documents": documents, "texts": texts}


def _mm1_data(*argv: str) -> None:
    code = data_cli.main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(f"mm1 data {' '.join(map(str, argv))} exited with {code}")


def _describe(corpus: Dict[str, object], inputs: Dict[str, Path]) -> Dict[str, object]:
    """What the corpus holds, in the tokenizer's tokens (bos and eos included)."""
    tokenizer = build_tokenizer(str(corpus["tokenizer_kind"]), corpus["tokenizer_path"])
    captions = json.loads(inputs["captions"].read_text())["annotations"]
    caption_tokens = [len(tokenizer.encode(a["caption"])) + 2 for a in captions]
    doc_images, doc_tokens = [], []
    for line in inputs["documents"].read_text().splitlines():
        segments = json.loads(line)["segments"]
        doc_images.append(sum("image" in s for s in segments))
        doc_tokens.append(sum(len(tokenizer.encode(s["text"])) for s in segments if "text" in s))
    texts = [json.loads(line)["text"] for line in inputs["texts"].read_text().splitlines()]
    text_tokens = [len(tokenizer.encode(text)) + 2 for text in texts]
    return {
        "jpegs": len(list(inputs["images"].glob("*.jpg"))),
        "jpeg_bytes_mean": float(np.mean([p.stat().st_size for p in inputs["images"].iterdir()])),
        "caption_pairs": len(captions),
        "caption_tokens_mean": float(np.mean(caption_tokens)),
        "documents": len(doc_images),
        "document_images": [min(doc_images), max(doc_images), float(np.mean(doc_images))],
        "document_text_tokens_mean": float(np.mean(doc_tokens)),
        "text_documents": len(texts),
        "text_tokens": int(sum(text_tokens)),
        "tokenizer_vocab_size": tokenizer.vocab_size,
    }


def build_corpus(folder: Path, settings: Dict[str, object]) -> Dict[str, object]:
    """Build the corpus in ``folder`` (or reuse the one a run with the same settings left
    there); returns its paths and description (``corpus.json``)."""
    record = folder / "corpus.json"
    if record.exists():
        corpus = json.loads(record.read_text())
        if corpus["settings"] == settings:
            return corpus
        raise ValueError(
            f"{folder} holds a corpus built with other settings ({corpus['settings']}); "
            f"name an empty folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    inputs = _write_inputs(folder, settings)
    kind = str(settings["tokenizer"])
    model = None
    if kind == "sentencepiece":
        prefix = folder / "tokenizer" / "bench"
        _mm1_data(
            "tokenizer",
            inputs["documents"],
            inputs["texts"],
            "--vocab-size",
            TOKENIZER_VOCAB,
            "--output",
            prefix,
        )
        model = f"{prefix}.model"
    tokenizer_args = ["--tokenizer", kind] + (["--tokenizer-path", model] if model else [])
    shards = folder / "shards"
    _mm1_data(
        "shards", "coco", inputs["captions"], "--images", inputs["images"],
        "--output", shards / "caption", "--samples-per-shard", 64, "--no-progress",
    )  # fmt: skip
    _mm1_data(
        "shards", "interleaved", inputs["documents"], "--images", inputs["images"],
        "--output", shards / "interleaved", "--samples-per-shard", 16, "--no-progress",
    )  # fmt: skip
    _mm1_data(
        "text-index", inputs["texts"], *tokenizer_args,
        "--output", folder / "text" / "corpus", "--no-progress",
    )  # fmt: skip
    corpus = {
        "settings": settings,
        "caption": str(shards / "caption"),
        "interleaved": str(shards / "interleaved"),
        "text": str(folder / "text" / "corpus"),
        "tokenizer_kind": kind,
        "tokenizer_path": model,
    }
    corpus["description"] = _describe(corpus, inputs)
    record.write_text(json.dumps(corpus, indent=1))
    return corpus


def shard_overrides(corpus: Dict[str, object]) -> List[str]:
    """``data.*`` overrides that train on the corpus, with MM1's mixture."""
    return [
        "data.source=webdataset",
        f"data.mixture={MM1_MIXTURE}",
        *(f"data.shards.{kind}={json.dumps([corpus[kind]])}" for kind in SHARD_KINDS),
        f"data.tokenizer.kind={corpus['tokenizer_kind']}",
        f"data.tokenizer.path={json.dumps(corpus['tokenizer_path'])}",
    ]


SHARD_KINDS = ("caption", "interleaved", "text")


def _print_corpus(description: Dict[str, object], kind: str) -> None:
    d = description
    low, high, mean = d["document_images"]
    print(
        f"corpus: {d['caption_pairs']} caption pairs (mean {d['caption_tokens_mean']:.1f} "
        f"tokens with bos/eos), {d['documents']} interleaved documents ({low}-{high} images, "
        f"mean {mean:.1f}; mean {d['document_text_tokens_mean']:.0f} text tokens), "
        f"{d['text_documents']} text documents ({d['text_tokens']} tokens); "
        f"{d['jpegs']} distinct 640x480 JPEGs (mean {d['jpeg_bytes_mean'] / 1024:.0f} KiB); "
        f"tokenizer {kind} ({d['tokenizer_vocab_size']} tokens)"
    )


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(REPO / "configs/mm1_30b.yaml"))
    parser.add_argument("--dp", type=int, nargs="+", default=[4, 8, 64])
    parser.add_argument("--steps", type=int, default=5)
    shards = parser.add_argument_group("--shards: real-shaped data through the webdataset source")
    shards.add_argument("--shards", action="store_true", help="build a corpus and measure on it")
    shards.add_argument("--workdir", help="where to build (and keep) it; default a temporary one")
    shards.add_argument("--jpegs", type=int, default=128, help="distinct JPEGs")
    shards.add_argument("--caption-pairs", type=int, default=256)
    shards.add_argument("--documents", type=int, default=64, help="interleaved documents")
    shards.add_argument("--text-documents", type=int, default=256)
    shards.add_argument(
        "--tokenizer",
        choices=("sentencepiece", "synthetic"),
        help="sentencepiece (the default where it is installed): trained on the corpus "
        "with `mm1 data tokenizer`",
    )
    shards.add_argument("--corpus-seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="config overrides (after the shards')")
    args = parser.parse_args(argv)
    if any(dp < 1 for dp in args.dp) or args.steps < 1:
        parser.error("--dp and --steps must be >= 1")
    if args.tokenizer is None:
        installed = importlib.util.find_spec("sentencepiece") is not None
        args.tokenizer = "sentencepiece" if installed else "synthetic"
    return args


def corpus_settings(args: argparse.Namespace) -> Dict[str, object]:
    return {
        "version": CORPUS_VERSION,
        "jpegs": args.jpegs,
        "caption_pairs": args.caption_pairs,
        "documents": args.documents,
        "text_documents": args.text_documents,
        "tokenizer": args.tokenizer,
        "seed": args.corpus_seed,
    }


def run(args: argparse.Namespace, workdir: Optional[Path]) -> int:
    torch.set_num_threads(1)
    overrides = list(args.overrides)
    summary: Dict[str, object] = {}
    if args.shards:
        corpus = build_corpus(workdir, corpus_settings(args))
        setup_logging(logging.WARNING)  # the build's INFO lines are done
        overrides = shard_overrides(corpus) + overrides
        summary["corpus"] = corpus
        _print_corpus(corpus["description"], corpus["tokenizer_kind"])
    cfg = load_config(args.config, overrides)
    figures = []
    for dp in args.dp:
        result = measure(cfg, dp, args.steps)
        figures.append(result)
        load, plan = result["load_s"], result["plan_s"]
        print(
            f"DP={dp:>3} ({result['sequences_per_rank']} sequences per rank): load "
            f"{load['median']:.4f} s [{load['min']:.4f}, {load['max']:.4f}], plan "
            f"{plan['median']:.4f} s [{plan['min']:.4f}, {plan['max']:.4f}], N={load['n']}; "
            f"plan / load {result['plan_over_load']:.2%}; plan: costs "
            f"{result['costs_share_of_plan']:.1%}, assignment "
            f"{1 - result['costs_share_of_plan']:.1%}; images per step (median) "
            f"{result['images_per_step']['median']:g}"
        )
    print(
        json.dumps(
            {
                "config": args.config,
                "overrides": overrides,
                "source": cfg.data.source,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "machine": platform.machine(),
                **summary,
                "figures": figures,
            }
        )
    )
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if not args.shards or args.workdir:
            return run(args, Path(args.workdir) if args.workdir else None)
        with tempfile.TemporaryDirectory(prefix="bench_balance_") as folder:
            return run(args, Path(folder))
    except ValueError as exc:  # a bad config, override or --workdir
        print(f"bench_balance: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
