#!/usr/bin/env python
"""Packed-sequence attention on CPU, in one run at MM1-3B width (hidden 3072, 24 heads,
8 query groups) and 4096 tokens:

1. speed of the per-document core attention against the slicing version shipped before
   issue 26 (``SlicedDocumentAttention`` below: the same math, each document a slice of
   q/k/v), forward and backward timed separately, at 1, 8, 16, 32 and 64 documents per
   row; the two alternate, and each figure is the median, min and max of ``--repeats``;
2. the dense-mask reference against per-document attention, packed as an MM1 caption
   sequence (16 documents) and as one document: core attention forward + backward
   (median time, peak memory) and one whole decoder layer (peak memory).

Peak memory is the growth of the process's peak resident set during one forward +
backward, each measurement in a fresh process so no earlier allocation hides it. The
last line printed is one JSON object with the figures and the ratios.

    python tools/bench_attention.py                 # about 6 minutes on 2 cores
    python tools/bench_attention.py --speed-only    # part 1 only, about a minute
    python tools/bench_attention.py --tiny          # seconds: a smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PATHS = {"reference": "dense_mask_reference", "new": "per_document"}
PACKINGS = ("16_documents", "1_document")
DOCUMENTS_PER_ROW = (1, 8, 16, 32, 64)
MM1_3B = dict(hidden=3072, heads=24, groups=8, ffn=8192, seq=4096)
TINY = dict(hidden=64, heads=4, groups=2, ffn=128, seq=256)


def document_ids(packing: str, seq: int):
    import torch

    if packing == "1_document":
        return torch.zeros(1, seq, dtype=torch.long)
    # An MM1 caption sequence: 16 image-caption pairs of unequal length filling the row.
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(16, generator=generator) + 0.5
    lengths = (weights / weights.sum() * seq).long()
    lengths[-1] += seq - int(lengths.sum())
    return torch.repeat_interleave(torch.arange(16), lengths).unsqueeze(0)


def evenly_packed(documents: int, seq: int):
    """``[1, seq]`` ids: ``documents`` documents of unequal length (0.5x-1.5x the mean)."""
    import torch

    generator = torch.Generator().manual_seed(documents)
    weights = torch.rand(documents, generator=generator) + 0.5
    lengths = (weights / weights.sum() * seq).long().clamp(min=1)
    lengths[-1] += seq - int(lengths.sum())
    return torch.repeat_interleave(torch.arange(documents), lengths).unsqueeze(0)


def _sliced_attention_class():
    from mm1_megatron.models.attention import DocumentAttention, document_segments

    class SlicedDocumentAttention(DocumentAttention):
        """The per-document attention shipped before issue 26, kept as the baseline: each
        document a slice of q/k/v, so each slice's backward allocates, zero-fills and adds
        a full-size gradient."""

        def forward(self, query, key, value, attention_mask, *args, **kwargs):
            import torch
            import torch.nn.functional as F

            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            rows = []
            for row, spans in enumerate(document_segments(attention_mask)):
                pieces = [
                    F.scaled_dot_product_attention(
                        q[row : row + 1, :, start:end],
                        k[row : row + 1, :, start:end],
                        v[row : row + 1, :, start:end],
                        is_causal=True,
                        scale=self.softmax_scale,
                        enable_gqa=q.shape[1] != k.shape[1],
                    )
                    for start, end in spans
                ]
                rows.append(torch.cat(pieces, dim=2))
            context = torch.cat(rows, dim=0)
            sq, b = query.shape[0], query.shape[1]
            return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    return SlicedDocumentAttention


def _timed_pass(module, inputs, ids):
    """(forward seconds, backward seconds) of one pass; gradients cleared first."""
    import torch

    for tensor in inputs:
        tensor.grad = None
    start = time.perf_counter()
    out = module(*inputs, ids)
    middle = time.perf_counter()
    out.backward(torch.ones_like(out))
    return middle - start, time.perf_counter() - middle


def _spread(samples) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
    }


def speed_against_slicing(shape: dict, documents_per_row, repeats: int) -> dict:
    """Part 1: forward and backward seconds of the shipped and the sliced per-document
    attention, alternating; also checks that their gradients are bitwise equal."""
    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from mm1_megatron.models.attention import DocumentAttention

    _, config = _transformer_config(shape)
    contenders = {
        "sliced_before": _sliced_attention_class()(
            config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
        ),
        "per_document": DocumentAttention(
            config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self"
        ),
    }
    head_dim = shape["hidden"] // shape["heads"]
    results = {}
    for documents in documents_per_row:
        ids = evenly_packed(documents, shape["seq"])
        generator = torch.Generator().manual_seed(documents)
        base = [
            torch.randn(shape["seq"], 1, heads, head_dim, generator=generator)
            for heads in (shape["heads"], shape["groups"], shape["groups"])
        ]
        inputs = {name: [t.clone().requires_grad_() for t in base] for name in contenders}
        samples = {name: ([], []) for name in contenders}
        for repeat in range(repeats + 1):  # the first round warms up
            for name, module in contenders.items():
                forward, backward = _timed_pass(module, inputs[name], ids)
                if repeat:
                    samples[name][0].append(forward)
                    samples[name][1].append(backward)
        bitwise = all(torch.equal(a.grad, b.grad) for a, b in zip(*(inputs[n] for n in contenders)))
        row = {
            name: {"forward": _spread(f), "backward": _spread(b)}
            for name, (f, b) in samples.items()
        }
        for part in ("forward", "backward"):
            row[f"{part}_speedup"] = (
                row["sliced_before"][part]["median"] / row["per_document"][part]["median"]
            )
        before, now = (
            statistics.median(f + b for f, b in zip(*samples[name])) for name in contenders
        )
        row["total_speedup"] = before / now
        row["gradients_bitwise_equal"] = bitwise
        results[f"{documents}_documents"] = row
        _print_speed_row(documents, row)
    return results


def _print_speed_row(documents: int, row: dict) -> None:
    def cell(name, part):
        spread = row[name][part]
        return f"{spread['median']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"

    for part in ("forward", "backward"):
        print(
            f"{documents:3d} documents {part:8s} sliced {cell('sliced_before', part):>22s}   "
            f"now {cell('per_document', part):>22s}   x{row[f'{part}_speedup']:.2f}",
            flush=True,
        )
    print(
        f"{documents:3d} documents total    x{row['total_speedup']:.2f}   gradients bitwise "
        f"equal: {row['gradients_bitwise_equal']}",
        flush=True,
    )


def _transformer_config(shape: dict):
    from mm1_megatron.config import ParallelConfig, load_config
    from mm1_megatron.models.transformer_configs import (
        RuntimeOptions,
        language_transformer_config,
    )

    overrides = [
        f"model.llm.hidden_size={shape['hidden']}",
        f"model.llm.num_attention_heads={shape['heads']}",
        f"model.llm.num_query_groups={shape['groups']}",
        f"model.llm.ffn_hidden_size={shape['ffn']}",
        "model.llm.num_layers=1",
    ]
    model = load_config(None, overrides).model
    return model, language_transformer_config(model, ParallelConfig(), RuntimeOptions())


def _core_attention(path: str, shape: dict):
    import torch
    from megatron.core.transformer.enums import AttnMaskType

    from mm1_megatron.models.attention import DenseMaskAttention, DocumentAttention

    _, config = _transformer_config(shape)
    cls = DenseMaskAttention if path == "reference" else DocumentAttention
    module = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    head_dim = shape["hidden"] // shape["heads"]
    generator = torch.Generator().manual_seed(1)

    def tensor(heads):
        return torch.randn(shape["seq"], 1, heads, head_dim, generator=generator).requires_grad_()

    inputs = (tensor(shape["heads"]), tensor(shape["groups"]), tensor(shape["groups"]))

    def run(ids):
        out = module(*inputs, ids)
        out.backward(torch.ones_like(out))

    return run


def _decoder_layer(path: str, shape: dict):
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from mm1_megatron.models.specs import language_block_spec

    model, config = _transformer_config(shape)
    spec = language_block_spec(config, "local", attention=PATHS[path])
    from megatron.core.transformer.transformer_block import TransformerBlock

    block = TransformerBlock(config, spec)
    rotary = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0)
    hidden = torch.randn(shape["seq"], 1, shape["hidden"]).requires_grad_()

    def run(ids):
        out = block(hidden, ids, rotary_pos_emb=rotary(shape["seq"]))
        out.backward(torch.ones_like(out))

    return run


def _reset_peak_resident() -> None:
    """Linux resets the process's peak resident set (VmHWM) on ``5 > clear_refs``."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak since start-up is used, which can only overstate


def _peak_resident() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _init_single_process() -> None:
    import torch.distributed as dist

    from mm1_megatron.config import ParallelConfig
    from mm1_megatron.parallel import init_distributed

    if not dist.is_initialized():
        init_distributed(ParallelConfig())


def measure(kind: str, path: str, packing: str, shape: dict, repeats: int) -> dict:
    """In this (fresh) process: peak-memory growth of one run, then the median time."""
    import psutil

    from mm1_megatron.parallel import seed_everything

    _init_single_process()
    seed_everything(0)
    run = (_core_attention if kind == "core_attention" else _decoder_layer)(path, shape)
    ids = document_ids(packing, shape["seq"])
    resident_before = psutil.Process().memory_info().rss
    _reset_peak_resident()
    run(ids)
    peak_growth = _peak_resident() - resident_before
    times = []
    for _ in range(repeats if kind == "core_attention" else 0):
        start = time.perf_counter()
        run(ids)
        times.append(time.perf_counter() - start)
    return {
        "peak_mib": max(peak_growth, 0) / 2**20,
        "seconds": statistics.median(times) if times else None,
    }


def _in_subprocess(kind, path, packing, tiny, repeats) -> dict:
    command = [
        sys.executable,
        __file__,
        "--measure",
        kind,
        path,
        packing,
        "--repeats",
        str(repeats),
    ] + (["--tiny"] if tiny else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--speed-only", action="store_true", help="part 1 only (no dense-mask reference)"
    )
    parser.add_argument(
        "--measure", nargs=3, metavar=("KIND", "PATH", "PACKING"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    shape = TINY if args.tiny else MM1_3B
    if args.measure:
        print(json.dumps(measure(*args.measure, shape=shape, repeats=args.repeats)))
        return
    _init_single_process()
    documents = (1, 8) if args.tiny else DOCUMENTS_PER_ROW
    speed = speed_against_slicing(shape, documents, args.repeats)
    if args.speed_only:
        print(json.dumps({"shape": shape, "speed_against_slicing": speed}))
        return
    results = {}
    for kind in ("core_attention", "decoder_layer"):
        for packing in PACKINGS:
            for path in PATHS:
                if args.tiny:  # one process: the smoke test checks the script, not memory
                    figures = measure(kind, path, packing, shape=shape, repeats=args.repeats)
                else:
                    figures = _in_subprocess(kind, path, packing, args.tiny, args.repeats)
                results[f"{kind}/{packing}/{path}"] = figures
                seconds = f"{figures['seconds']:.3f} s" if figures["seconds"] else "-"
                print(
                    f"{kind:15s} {packing:13s} {path:10s} {seconds:>10s} "
                    f"{figures['peak_mib']:10.1f} MiB peak",
                    flush=True,
                )
    ratios = {}
    for kind in ("core_attention", "decoder_layer"):
        for packing in PACKINGS:
            ref, new = (results[f"{kind}/{packing}/{p}"] for p in PATHS)
            ratios[f"{kind}/{packing}/memory_ratio"] = ref["peak_mib"] / max(new["peak_mib"], 1e-3)
            if ref["seconds"]:
                ratios[f"{kind}/{packing}/speedup"] = ref["seconds"] / new["seconds"]
    summary = {"shape": shape, "speed_against_slicing": speed}
    print(json.dumps({**summary, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
