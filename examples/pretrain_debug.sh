#!/usr/bin/env bash
# The tiny debug model on the embedded synthetic data: CPU (2 cores, ~3 min) or one GPU.
set -euo pipefail
mm1 train --config configs/debug.yaml "$@"
