"""Fixes for loading Megatron-Core optimizers that run torch's AdamW (no apex, no TE).

Megatron-Core 0.16 keeps AdamW's ``step`` inside each parameter's state when neither
apex nor Transformer Engine is installed, but ``fully_reshardable`` checkpoints store the
step once per param group. Loading then copies every state entry of the live optimizer
from the checkpoint and fails on the ``step`` the checkpoint has no per-parameter entry
for. We copy the other entries and leave ``step``, which Megatron-Core restores from the
param groups itself.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_state = {"applied": False}


def apply_distributed_optimizer_step_fix() -> None:
    if _state["applied"]:
        return
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states_keeping_step(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        optimizer_state = self.optimizer.state[main_param]
        step = optimizer_state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                optimizer_state["step"] = step

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step
    _state["applied"] = True


def untie_adam_steps(optimizer) -> None:
    """Give every parameter its own AdamW ``step`` tensor after a load.

    Megatron-Core 0.16 (without apex/TE) restores one ``step`` tensor shared by all
    parameters; torch's AdamW increments ``step`` in place per parameter, so a shared
    tensor would advance once per parameter per update and corrupt the bias correction.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()
