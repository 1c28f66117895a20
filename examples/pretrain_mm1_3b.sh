#!/usr/bin/env bash
# MM1-3B pre-training recipe (45/45/10 mixture, 200k steps, batch 512 x 4096) on 8 nodes.
# Run the same command on every node with MASTER_ADDR set to the first node's host name
# (under SLURM use cluster/slurm_mm1.sbatch instead, which finds it itself).
# As written it trains on the embedded synthetic source (throughput and MFU runs). For your
# corpora stack an overlay or add overrides (docs/data.md), e.g.
#   examples/pretrain_mm1_3b.sh --config my_data.yaml data.num_workers=4
# where my_data.yaml sets data.source: webdataset and data.shards / data.tokenizer.
set -euo pipefail
NNODES=${NNODES:-8} cluster/torchrun_multinode.sh --config configs/mm1_3b.yaml "$@"
