#!/usr/bin/env bash
# The debug model with tensor parallelism over 2 processes (gloo on CPU, NCCL on GPU).
set -euo pipefail
torchrun --nproc-per-node 2 -m mm1_megatron.train --config configs/debug.yaml \
  parallel.tensor_parallel_size=2 logging.output_dir=runs/debug_tp2 "$@"
