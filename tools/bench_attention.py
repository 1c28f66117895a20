#!/usr/bin/env python
"""Packed-sequence attention on CPU: the dense-mask reference vs per-document attention.

Side by side in one run, at MM1-3B width (hidden 3072, 24 heads, 8 query groups) and
4096 tokens, packed as an MM1 caption sequence (16 documents) and as one document:

- core attention forward + backward: median time and peak memory;
- one whole decoder layer (forward + backward): peak memory.

Peak memory is the growth of the process's peak resident set during one forward +
backward, each measurement in a fresh process so no earlier allocation hides it. The
last line printed is one JSON object with the figures and the ratios.

    python tools/bench_attention.py                 # about 3 minutes on 2 cores
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


def measure(kind: str, path: str, packing: str, shape: dict, repeats: int) -> dict:
    """In this (fresh) process: peak-memory growth of one run, then the median time."""
    import psutil
    import torch.distributed as dist

    from mm1_megatron.config import ParallelConfig
    from mm1_megatron.parallel import init_distributed, seed_everything

    if not dist.is_initialized():
        init_distributed(ParallelConfig())
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--measure", nargs=3, metavar=("KIND", "PATH", "PACKING"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    shape = TINY if args.tiny else MM1_3B
    if args.measure:
        print(json.dumps(measure(*args.measure, shape=shape, repeats=args.repeats)))
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
    print(json.dumps({"shape": shape, "results": results, "ratios": ratios}))


if __name__ == "__main__":
    main()
