"""Reading Megatron-Core's MoE auxiliary-loss tracker on every supported release.

megatron-core 0.16 keeps the per-layer auxiliary losses in a dict returned by
``moe_utils.get_moe_layer_wise_logging_tracker()`` and reduces it with
``reduce_aux_losses_tracker_across_ranks()``; 0.19 replaces both with a
``MoEMetricsTracker`` object (``moe_logging.get_moe_metrics_tracker()``) and deprecates
the old functions. Both reduce the same way: summed over the pipeline group (each stage
holds its own layers' rows), then over each entry's reduce group, then averaged.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

_HAS_METRICS_TRACKER: bool
try:  # feature detection by module: 0.19 has moe_logging, 0.16 does not
    from megatron.core.transformer.moe import moe_logging

    _HAS_METRICS_TRACKER = hasattr(moe_logging, "get_moe_metrics_tracker")
except ImportError:
    moe_logging = None
    _HAS_METRICS_TRACKER = False


def collect_moe_aux_losses(
    names: Sequence[str], *, num_layers: int, device: torch.device
) -> Dict[str, torch.Tensor]:
    """Reduce the auxiliary losses ``names`` across ranks and return them per layer
    (``{name: [num_layers]}``, summed over the micro-batches since the last call), then
    reset the tracker.

    Collective over the pipeline group for every name, on every stage: a stage without
    MoE layers records nothing, so its entries are created as zeros first (as
    Megatron-LM's ``force_initialize`` does); otherwise it would skip the all-reduce the
    other stages wait in. ``names`` must be the same on every rank (derive it from the
    config), and ``num_layers`` the decoder's total layer count (the tracker's size).
    """
    names = list(names)
    if _HAS_METRICS_TRACKER:
        tracker = moe_logging.get_moe_metrics_tracker()
        for name in names:
            tracker.ensure_initialized(name, num_layers, device=device)
        if names:
            tracker._sync_metrics(names)  # what tracker.report() runs, without logging
        values = {name: tracker.metrics[name].values.clone() for name in names}
        tracker.clear()
        return values
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in names:
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(num_layers, device=device)}
    if names:
        moe_utils.reduce_aux_losses_tracker_across_ranks(track_names=names)
    values = {name: tracker[name]["values"].clone() for name in names}
    moe_utils.clear_aux_losses_tracker()
    return values


def forget_moe_aux_losses() -> None:
    """Drop every entry of the tracker. Megatron-Core sizes an entry by the decoder's layer
    count when a router first records into it and keeps it for the life of the process, so
    a second model with more layers in the same process (a notebook, several runs in one
    interpreter) indexed past the first one's entry (``IndexError`` in the router)."""
    if _HAS_METRICS_TRACKER:
        moe_logging.get_moe_metrics_tracker().metrics.clear()
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.get_moe_layer_wise_logging_tracker().clear()
