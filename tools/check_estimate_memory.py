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

Rows print on the first tensor- and data-parallel rank of each pipeline stage.
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
    from mm1_megatron.scaling.estimate.measure import measure_train_step
    from mm1_megatron.scaling.estimate.memory import estimate_memory
    from mm1_megatron.scaling.estimate.workload import default_workload
    from mm1_megatron.training.trainer import Trainer

    cfg = validate_config(load_config(args.config, args.overrides))
    trainer = Trainer(cfg)
    counter = _CountImages(trainer.data)
    trainer.data = counter
    try:
        got = measure_train_step(trainer, warmup_steps=args.warmup)
        measured_counts = counter.counts[-trainer.num_microbatches :]
        micro = cfg.training.micro_batch_size
        workload = dataclasses.replace(
            default_workload(cfg), images_per_sequence=max(measured_counts) / micro
        )
        device = "gpu" if torch.cuda.is_available() else "cpu"
        estimate = estimate_memory(cfg, workload, num_gpus=trainer.ctx.world_size, device=device)
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
            print(
                f"stage {stage.stage} on {name}: images per micro-batch {measured_counts}, "
                f"estimate for {max(measured_counts)}"
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
                    "rows": {k: {"estimated": e, "measured": m} for k, (e, m) in rows.items()},
                    "estimated_activations": stage.to_dict(),
                }
                path = Path(args.output)
                if parallel_state.get_pipeline_model_parallel_world_size() > 1:
                    path = path.with_name(f"{path.stem}.stage{stage.stage}{path.suffix}")
                path.write_text(json.dumps(record, indent=2))
    finally:
        trainer.data.close()
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
