#!/usr/bin/env bash
# The scaling study of examples/scaling/sweep.yaml, end to end on CPU (about 10 minutes on
# 2 cores): expand the sweep, train its four runs one after another, report and fit.
# Writes runs/scaling/ (configs, logs, metrics) and runs/scaling/report/ (report.md,
# report.csv, report.json, PNG plots). Rerunning skips the runs that completed.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/scaling}
mm1 sweep expand examples/scaling/sweep.yaml --output "$out"
mm1 sweep run "$out"
mm1 report --sweep "$out" --output "$out/report" --params llm_active_non_embedding
