"""Data scalars for the training log: skipped samples and packing efficiency.

``data_metrics`` sums over the data-parallel group (every DP rank must call it, every
step, as with any collective); tensor- and pipeline-parallel replicas are not counted
twice because the sum runs over the DP group only.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from mm1_megatron.data.pipeline.loader import stats_vector
from mm1_megatron.data.shards.skips import SKIP_REASONS, STAT_NAMES
from mm1_megatron.parallel.collectives import all_reduce_values


def data_metrics(
    loader, batches: Sequence[Dict[str, torch.Tensor]], *, group=None
) -> Dict[str, float]:
    """``data/skipped/<reason>`` and ``data/skipped`` (cumulative since the loader was
    built), ``data/unused_samples`` and ``data/shortened_conversations`` (cumulative), and
    ``data/packing_efficiency`` (real tokens / token slots over ``batches``, this step's
    micro-batches)."""
    real = sum(int(batch["num_real_tokens"].sum()) for batch in batches)
    slots = sum(int(batch["tokens"].numel()) for batch in batches)
    values = all_reduce_values(stats_vector(loader) + [real, slots], group=group)
    counts = dict(zip(STAT_NAMES, values[: len(STAT_NAMES)]))
    metrics = {f"data/skipped/{reason}": counts[reason] for reason in SKIP_REASONS}
    metrics["data/skipped"] = sum(counts[reason] for reason in SKIP_REASONS)
    metrics["data/unused_samples"] = counts["unused_samples"]
    metrics["data/shortened_conversations"] = counts["shortened_conversations"]
    total_real, total_slots = values[-2], values[-1]
    metrics["data/packing_efficiency"] = total_real / total_slots if total_slots else float("nan")
    return metrics
