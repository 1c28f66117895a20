#!/usr/bin/env bash
# The debug model with TP=2 under Open MPI (pip install -e .[mpi]); same losses as torchrun.
set -euo pipefail
mpiexec --allow-run-as-root --oversubscribe -n 2 python -m mm1_megatron.train \
  --config configs/debug.yaml parallel.tensor_parallel_size=2 parallel.launcher=mpi \
  logging.output_dir=runs/debug_mpi "$@"
