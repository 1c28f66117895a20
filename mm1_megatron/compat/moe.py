"""Reading Megatron-Core's MoE auxiliary-loss tracker on every supported release.

megatron-core 0.16 keeps the per-layer auxiliary losses in a dict returned by
``moe_utils.get_moe_layer_wise_logging_tracker()`` and reduces it with
``reduce_aux_losses_tracker_across_ranks()``; 0.19 replaces both with a
``MoEMetricsTracker`` object (``moe_logging.get_moe_metrics_tracker()``) and deprecates
the old functions. Both reduce the same way: summed over the pipeline group (each stage
holds its own layers' rows), then over each entry's reduce group, then averaged.
"""

from __future__ import annotations

from typing import Dict

import torch

_HAS_METRICS_TRACKER: bool
try:  # feature detection by module: 0.19 has moe_logging, 0.16 does not
    from megatron.core.transformer.moe import moe_logging
    _HAS_METRICS_TRACKER = hasattr(moe_logging, "get_moe_metrics_tracker")
except ImportError:
    moe_logging = None
    _HAS_METRICS_TRACKER = False


def collect_moe_aux_losses() -> Dict[str, torch.Tensor]:
    """Reduce the recorded auxiliary losses across ranks and return them per layer
    (``{name: [num_layers]}``, summed over the micro-batches since the last call), then
    reset the tracker. Collective over the pipeline group when anything was recorded."""
    if _HAS_METRICS_TRACKER:
        tracker = moe_logging.get_moe_metrics_tracker()
        names = list(tracker.metrics)
        if not names:
            return {}
        tracker._sync_metrics(names)  # what tracker.report() runs, without its logging
        values = {name: tracker.metrics[name].values.clone() for name in names}
        tracker.clear()
        return values
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks()
    values = {name: entry["values"].clone() for name, entry in tracker.items()}
    moe_utils.clear_aux_losses_tracker()
    return values
