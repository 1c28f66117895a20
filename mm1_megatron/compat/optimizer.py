"""Loading Megatron-Core optimizers that run torch's Adam/AdamW (no apex, no TE).

Without apex or Transformer Engine, megatron-core (0.16.1 and 0.19.2 alike) runs
``torch.optim.AdamW``, which keeps ``step`` in every parameter's state, while
``fully_reshardable`` checkpoints store it once per param group. Three things follow,
each handled here and only for optimizers that are torch Adam/AdamW (TE's and apex's
``FusedAdam`` keep ``step`` per param group, and their ``state_dict`` rejects a
per-parameter ``step``):

1. A fresh optimizer has no state to load into: ``prepare_for_load`` allocates it.
2. ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every state entry
   of the live optimizer from the checkpoint and fails on ``step``, which a
   ``fully_reshardable`` checkpoint has no per-parameter entry for (and a
   ``dp_reshardable`` one holds as 0: megatron-core does not save it). The replacement
   copies the other entries, under ``no_grad``, and leaves ``step``, which megatron-core
   restores from the param groups itself.
3. After a load megatron-core gives all parameters one shared ``step`` tensor, which
   torch's in-place increment would advance once per parameter: ``after_load`` unties it.
"""

from __future__ import annotations

from typing import Iterator

import torch

from mm1_megatron.compat.patching import replace_attribute, require_attribute

_WRITTEN_FOR = "megatron-core 0.16.1-0.19.2 without apex/TE (torch AdamW)"
_state = {"step_fix": False}


def _inner_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is not None:
            yield sub, inner


def _is_torch_adam(inner) -> bool:
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def megatron_uses_torch_adam() -> bool:
    """True when megatron-core found neither Transformer Engine nor apex (feature test)."""
    from megatron.core.optimizer import distrib_optimizer

    return not require_attribute(
        distrib_optimizer,
        "HAVE_APEX_OR_TE",
        reason="choosing the optimizer-state fixes",
        written_for=_WRITTEN_FOR,
    )


def install_step_fix() -> None:
    """Install fix 2 (start-up, only when megatron-core runs torch's AdamW)."""
    if _state["step_fix"]:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    @torch.no_grad()  # fp32: the main param is the model's own (a view that needs grad),
    # and dp_reshardable's loader, unlike the fully_reshardable one, copies without no_grad
    def set_states_keeping_step(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        # dp_reshardable checkpoints carry a per-parameter "step", but megatron-core does
        # not save it (the loaded value is the fresh state's 0): the param groups' step,
        # which megatron-core has just restored into the state, is the one to keep.
        tensors = {key: value for key, value in tensors.items() if key != "step"}
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        optimizer_state = self.optimizer.state[main_param]
        step = optimizer_state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                optimizer_state["step"] = step

    original = replace_attribute(
        DistributedOptimizer,
        "_set_main_param_and_optimizer_states",
        set_states_keeping_step,
        reason="torch AdamW keeps a per-parameter step the checkpoint stores per group",
        written_for=_WRITTEN_FOR,
    )
    _state["step_fix"] = True


def prepare_for_load(optimizer) -> None:
    """Give a fresh torch AdamW the state a checkpoint is loaded into (no-op for fused
    optimizers)."""
    for sub, inner in _inner_optimizers(optimizer):
        if not _is_torch_adam(inner):
            continue
        assert _state["step_fix"] or not hasattr(sub, "model_param_group_index_map"), (
            "install_patches() must run before a distributed torch AdamW is loaded"
        )
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)


def after_load(optimizer) -> None:
    """Give every parameter of a torch AdamW its own ``step`` tensor after a load."""
    for _, inner in _inner_optimizers(optimizer):
        if not _is_torch_adam(inner):
            continue
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()
