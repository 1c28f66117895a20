#!/usr/bin/env python
"""``mm1 estimate``'s memory per GPU against a measured training step, side by side.

Runs the trainer for ``--warmup`` steps and one measured step on this machine (the GPU if
there is one: the CUDA allocator's peak; else the CPU: the most tensor storage alive at
once), and prints estimated and measured weights, gradients, optimizer state, activations
at the peak and the total, for this rank's pipeline stage. The estimate is for the
micro-batch with the most images the measured step saw.

    python tools/check_estimate_memory.py --config configs/debug.yaml
    python tools/check_estimate_memory.py --config configs/mm1_3b.yaml \\
        model.llm.num_layers=4 training.global_batch_size=2 --output gpu_check.json
    torchrun --nproc-per-node 8 tools/check_estimate_memory.py --config configs/mm1_7b.yaml

Rows print on the first tensor- and data-parallel rank of each pipeline stage, and with
context parallelism on each of its CP ranks (``--output`` then writes one file per CP
rank, ``X.cp<rank>.json``): each CP rank is estimated for what it had, the images it
encoded and the padded query positions its attention built (``CountedShare``), as the
single-process check is estimated for the images its micro-batches had.

    torchrun --standalone --nproc-per-node 2 tools/check_estimate_memory.py \\
        --config configs/debug.yaml parallel.context_parallel_size=2 \\
        data.mixture.caption=1.0 data.mixture.interleaved=0 data.mixture.text=0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("check_estimate_memory")
GIB = 2**30


class _CountImages:
    """Wraps the trainer's micro-batch iterator and records each batch's image count."""

    def __init__(self, data):
        self.data, self.counts = data, []

    def __next__(self):
        batch = next(self.data)
        # Not images.shape[0]: at native resolution that counts patches.
        self.counts.append(int(batch["num_images"].sum()))
        return batch

    def __getattr__(self, name):
        return getattr(self.data, name)


class _CountEncodedImages:
    """Records how many images each ``encode_images`` call of ``model`` encodes: under
    context parallelism a rank encodes only the images with a token in its share."""

    def __init__(self, model):
        self.counts = []
        encode = model.encode_images

        def counted(images, image_grids=None):
            self.counts.append(len(image_grids) if image_grids is not None else images.shape[0])
            return encode(images, image_grids)

        model.encode_images = counted


class _CountPaddedPositions:
    """Records, per call of the context-parallel attention (one layer of one micro-batch),
    the query positions of its padded runs, placeholders included: a run of local queries
    that starts after its document's start is padded to the keys up to its end
    (``models/context_attention.py``)."""

    def __init__(self):
        from mm1_megatron.models import context_attention

        self.counts = []
        attend = context_attention.context_parallel_attention

        def counted(q, k, v, *, query_positions, segments, **kwargs):
            padded = 0
            for row in range(q.shape[0]):
                positions = query_positions[row]
                for (first, end), start in context_attention.document_runs(
                    positions, segments[row]
                ):
                    keys = int(positions[end - 1]) + 1 - start
                    padded += keys if keys > end - first else 0
            self.counts.append(padded)
            return attend(q, k, v, query_positions=query_positions, segments=segments, **kwargs)

        context_attention.context_parallel_attention = counted


def _mm1_model(chunk):
    while not hasattr(chunk, "encode_images") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", action="append", default=[], required=True)
    parser.add_argument("--warmup", type=int, default=1, help="steps before the measured one")
    parser.add_argument("--output", default=None, help="also write the comparison as JSON")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    setup_logging()

    import torch
    from megatron.core import parallel_state

    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.parallel import shutdown_distributed
    from mm1_megatron.scaling.estimate.context_parallel import CountedShare
    from mm1_megatron.scaling.estimate.measure import measure_train_step
    from mm1_megatron.scaling.estimate.memory import estimate_memory
    from mm1_megatron.scaling.estimate.stages import pipeline_stages
    from mm1_megatron.scaling.estimate.workload import default_workload
    from mm1_megatron.training.trainer import Trainer

    cfg = validate_config(load_config(args.config, args.overrides))
    trainer = Trainer(cfg)
    counter = _CountImages(trainer.data)
    trainer.data = counter
    cp = cfg.parallel.context_parallel_size
    first_chunk = _mm1_model(trainer.model_chunks[0])
    encoded = _CountEncodedImages(first_chunk) if hasattr(first_chunk, "encode_images") else None
    padded = _CountPaddedPositions() if cp > 1 else None
    try:
        got = measure_train_step(trainer, warmup_steps=args.warmup)
        measured_counts = counter.counts[-trainer.num_microbatches :]
        micro = cfg.training.micro_batch_size
        workload = dataclasses.replace(
            default_workload(cfg), images_per_sequence=max(measured_counts) / micro
        )
        counted = None
        if cp > 1:  # what this rank encoded and attended, per sequence, at its most
            m = trainer.num_microbatches
            images = max(encoded.counts[-m:] or [0]) if encoded is not None else 0
            stage_index = parallel_state.get_pipeline_model_parallel_rank()
            calls = m * len(pipeline_stages(cfg, m)[stage_index].decoder_layers)
            counted = CountedShare(
                images_per_sequence=images / micro,
                padded_positions_per_sequence=max(padded.counts[-calls:] or [0]) / micro,
            )
        device = "gpu" if torch.cuda.is_available() else "cpu"
        estimate = estimate_memory(
            cfg,
            workload,
            num_gpus=trainer.ctx.world_size,
            device=device,
            counted=counted,
        )
        stage = estimate.stages[parallel_state.get_pipeline_model_parallel_rank()]
        first_of_stage = (
            parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0
        )
        rows = {
            "weights": (stage.weights, got.weights),
            "gradients": (stage.gradients, got.gradients),
            "optimizer_states": (stage.optimizer_states, got.optimizer_states),
            "activations_peak": (stage.activations_peak, got.activations_peak),
            "total": (stage.total, got.step_peak),
        }
        if first_of_stage:
            name = torch.cuda.get_device_name() if device == "gpu" else "CPU"
            encoded_note = ""
            if counted is not None:
                cp_rank = parallel_state.get_context_parallel_rank()
                encoded_note = (
                    f"; CP rank {cp_rank} encoded {counted.images_per_sequence * micro:g} at "
                    "most, padded query positions "
                    f"{counted.padded_positions_per_sequence * micro:g}"
                )
            print(
                f"stage {stage.stage} on {name}: images per micro-batch {measured_counts}, "
                f"estimate for {max(measured_counts)}{encoded_note}"
            )
            print(f"{'':<18} {'estimated GiB':>13} {'measured GiB':>13} {'est/meas':>9}")
            for row, (est, meas) in rows.items():
                ratio = est / meas if meas else float("nan")
                print(f"{row:<18} {est / GIB:13.4f} {meas / GIB:13.4f} {ratio:9.3f}")
            if args.output:
                record = {
                    "device": name,
                    "configs": args.config,
                    "overrides": args.overrides,
                    "stage": stage.stage,
                    "images_per_micro_batch": measured_counts,
                    "context_parallel_rank": parallel_state.get_context_parallel_rank(),
                    "counted_share": dataclasses.asdict(counted) if counted else None,
                    "rows": {k: {"estimated": e, "measured": m} for k, (e, m) in rows.items()},
                    "estimated_activations": stage.to_dict(),
                }
                path = Path(args.output)
                if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                    path = path.with_name(f"{path.stem}.stage{stage.stage}{path.suffix}")
                if cp > 1:  # every CP rank of the first DP and TP rank writes its own
                    cp_rank = parallel_state.get_context_parallel_rank()
                    path = path.with_name(f"{path.stem}.cp{cp_rank}{path.suffix}")
                path.write_text(json.dumps(record, indent=2))
    finally:
        trainer.data.close()
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
