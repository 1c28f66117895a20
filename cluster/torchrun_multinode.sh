#!/usr/bin/env bash
# Launch mm1 train on every node of a multi-node job with torchrun's c10d rendezvous.
# Run the same command on each node; NODE_RANK is only needed for the static rendezvous.
#   NNODES=8 GPUS_PER_NODE=8 MASTER_ADDR=node0 MASTER_PORT=29500 \
#     cluster/torchrun_multinode.sh --config configs/mm1_30b.yaml
set -euo pipefail
: "${NNODES:=1}" "${GPUS_PER_NODE:=8}" "${MASTER_PORT:=29500}"
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ "$NNODES" -gt 1 ]; then
    # Each node would wait for the others at its own loopback address until the
    # rendezvous times out.
    echo "torchrun_multinode.sh: NNODES=$NNODES needs MASTER_ADDR, the host name of the" \
         "first node (the same on every node)" >&2
    exit 2
  fi
  MASTER_ADDR=127.0.0.1
fi
# Megatron-Core's tensor/sequence-parallel communication overlap relies on one hardware
# queue per GPU to keep its collectives ahead of the compute that waits for them.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
# The ViT's batch changes size every micro-batch (0-16 images, times the tiles), which
# fragments PyTorch's CUDA caching allocator; expandable segments grow in place instead.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
exec torchrun \
  --nnodes "${NNODES}" \
  --nproc-per-node "${GPUS_PER_NODE}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
  --rdzv-id "${RDZV_ID:-mm1}" \
  -m mm1_megatron.train "$@"
