#!/usr/bin/env python
"""Peak memory of a Hugging Face export: streamed (``mm1 convert export``) vs whole-model.

Builds a language-model checkpoint of the given shape, then exports it twice, each in a
fresh child process that reports its peak RSS (``VmHWM`` of ``/proc/self/status``, which
starts afresh at ``exec``; ``ru_maxrss`` would carry the parent's size over):

- ``streamed``: ``export_checkpoint``, which reads one unit (layer) at a time;
- ``whole-model`` (the baseline, how the exporter worked before): load every tensor into
  a TP=1 model, then write the same shards from memory.

    python tools/bench_export.py                       # ~0.75B parameters, 3 GB in fp32
    python tools/bench_export.py model.llm.num_layers=4 --max-shard-size 200MB
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_export")

SHAPE = [
    "model.llm.vocab_size=32000",
    "model.llm.hidden_size=2048",
    "model.llm.num_layers=12",
    "model.llm.num_attention_heads=16",
    "model.llm.num_query_groups=4",
    "model.llm.ffn_hidden_size=5632",
    "model.llm.max_sequence_length=2048",
    "training.seq_length=2048",
]


def _make_checkpoint(folder: Path, overrides) -> None:
    from mm1_megatron.config import load_config, save_config
    from mm1_megatron.conversion import megatron_io

    cfg = load_config("configs/debug.yaml", SHAPE + list(overrides))
    step = folder / "step_00000000"
    with megatron_io.single_process_world():
        model = megatron_io.build_tp1_model(
            megatron_io.placeholder_model_config(cfg.model, ["language_model"]), image_token_id=3
        )
        megatron_io.save_parts(model, step, ["language_model"])
    save_config(cfg, step / "config.yaml")


class _InMemory:
    """The whole model's tensors, served through the streaming interface."""

    def __init__(self, state):
        self.state = state

    def names(self, prefix=""):
        return [name for name in self.state if name.startswith(prefix)]

    def fetch(self, names):
        return {name: self.state[name].detach() for name in names}


def _export_whole_model(folder: Path, output: Path, max_shard_bytes: int) -> None:
    """The baseline: the full fp32 model in memory, then the same shards."""
    import torch

    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import megatron_io
    from mm1_megatron.conversion.export_layouts import language_model_tensors
    from mm1_megatron.conversion.safetensors_io import ShardedSafetensorsWriter

    step = megatron_io.resolve_step_folder(folder)
    cfg = load_config(step / "config.yaml")
    with megatron_io.single_process_world():
        model = megatron_io.build_tp1_model(
            megatron_io.placeholder_model_config(cfg.model, ["language_model"]), image_token_id=3
        )
        megatron_io.load_parts(model, step, ["language_model"])
        output.mkdir(parents=True)
        writer = ShardedSafetensorsWriter(output, max_shard_bytes=max_shard_bytes)
        source = _InMemory(megatron_io.state_of(model))
        for name, tensor in language_model_tensors(source, cfg.model.llm, dtype=torch.float32):
            writer.add(name, tensor)
        writer.close()


def _export_streamed(folder: Path, output: Path, max_shard_bytes: int) -> None:
    from mm1_megatron.conversion import ExportRequest, export_checkpoint

    export_checkpoint(
        ExportRequest(
            checkpoint=folder,
            output=output,
            format="language-model",
            dtype="float32",
            max_shard_bytes=max_shard_bytes,
        )
    )


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 2)  # the kernel reports kB
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def _child(mode: str, folder: Path, output: Path, max_shard_bytes: int) -> dict:
    """Run one export in a fresh process; its wall time and peak RSS."""
    start = time.perf_counter()
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            mode,
            "--folder",
            str(folder),
            "--output",
            str(output),
            "--max-shard-bytes",
            str(max_shard_bytes),
        ],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return {
        "mode": mode,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": json.loads(completed.stdout.strip().splitlines()[-1])["peak_rss_gb"],
    }


def _size_gb(folder: Path, pattern: str) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob(pattern)) / 1e9, 2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-shard-size", default="500MB")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=["streamed", "whole-model"])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--max-shard-bytes", type=int)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    if args.child:
        run = _export_streamed if args.child == "streamed" else _export_whole_model
        run(args.folder, args.output, args.max_shard_bytes)
        sys.stdout.write(json.dumps({"peak_rss_gb": _peak_rss_gb()}) + "\n")
        return

    from mm1_megatron.conversion.cli import parse_size

    max_shard_bytes = parse_size(args.max_shard_size)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        work = Path(work)
        start = time.perf_counter()
        _make_checkpoint(work / "ckpt", args.overrides)
        logger.info(
            "checkpoint: %.2f GB in %.0f s",
            _size_gb(work / "ckpt", "*.distcp"),
            time.perf_counter() - start,
        )
        results = [
            _child(mode, work / "ckpt" / "step_00000000", work / mode, max_shard_bytes)
            for mode in ("streamed", "whole-model")
        ]
        for result in results:
            result["exported_gb"] = _size_gb(work / result["mode"], "*.safetensors")
            logger.info("%s", json.dumps(result))


if __name__ == "__main__":
    main()
