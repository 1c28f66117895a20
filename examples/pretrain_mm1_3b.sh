#!/usr/bin/env bash
# MM1-3B pre-training recipe (45/45/10 mixture, 200k steps, batch 512 x 4096) on 8 nodes.
# Run the same command on every node with MASTER_ADDR set to the first node's host name
# (under SLURM use cluster/slurm_mm1.sbatch instead, which finds it itself).
# Real data sources plug in through data.source once available; until then this runs
# on the synthetic source, which is useful for throughput and MFU measurements.
set -euo pipefail
NNODES=${NNODES:-8} cluster/torchrun_multinode.sh --config configs/mm1_3b.yaml "$@"
