"""MoE expert modules that let the caller draw each expert's weights from its own stream.

``SequentialMLP`` (a loop of ``MLP`` experts):

Megatron-Core's ``SequentialMLP.__init__`` builds its local experts in one loop with no
hook, so a caller that must draw each expert from its own random stream (layout-invariant
initialisation, ``models/seeding.py``) needs that loop reproduced. This is the only copy,
checked against megatron-core 0.16.1 and 0.19.2: it asks the parent for zero experts and
appends ``MLP`` experts itself with the same arguments the parent would pass (0.19 also
passes a ``name``; detected from ``MLP``'s signature).

``TEGroupedMLP`` (Transformer Engine's grouped GEMM): the parent builds all local experts
at once as ``linear_fc1.weight{i}`` / ``linear_fc2.weight{i}``; afterwards each is
redrawn by the caller (``grouped_mlp_with_expert_init``). That attribute layout is checked
at construction, so a megatron-core or TE that renames it fails loudly.
"""

from __future__ import annotations

import inspect
from typing import Callable, Tuple

import torch
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu as initialize_affine_weight_cpu,  # noqa: F401 (re-export)
)
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

from mm1_megatron.compat.patching import register_patch

_MLP_TAKES_NAME = "name" in inspect.signature(MLP.__init__).parameters
_WRITTEN_FOR = "megatron-core 0.16.1-0.19.2"

# Called once per MoE layer at construction start; returns the per-expert callback,
# which is given each local expert's global index before that expert is built.
ExpertHookFactory = Callable[[], Callable[[int], None]]


# Registered on import (models import this module), so the start-up log lists it.
register_patch(
    "megatron.core.transformer.moe.experts.SequentialMLP.__init__ (subclass)",
    reason="build each MoE expert from its own seed (layout-invariant init)",
    written_for=_WRITTEN_FOR,
)


def sequential_mlp_with_expert_hook(make_hook: ExpertHookFactory) -> type:
    class HookedSequentialMLP(SequentialMLP):
        def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
            before_expert = make_hook()
            super().__init__(0, config, submodules, pg_collection=pg_collection, **kwargs)
            self.num_local_experts = num_local_experts
            first_expert = self.ep_group.rank() * num_local_experts
            name = kwargs.get("name")
            for local_index in range(num_local_experts):
                before_expert(first_expert + local_index)
                extra = {}
                if _MLP_TAKES_NAME:
                    extra["name"] = (
                        f"{name}.local_experts.{local_index}" if name is not None else None
                    )
                self.local_experts.append(
                    MLP(
                        self.config,
                        submodules,
                        ffn_hidden_size=self.config.moe_ffn_hidden_size,
                        is_expert=True,
                        tp_group=self.tp_group,
                        **extra,
                    )
                )

    return HookedSequentialMLP


register_patch(
    "megatron.core.transformer.moe.experts.TEGroupedMLP.__init__ (subclass)",
    reason="redraw each grouped MoE expert from its own seed (layout-invariant init)",
    written_for=_WRITTEN_FOR,
)

# Given (config, global expert index, fc1 weight, fc2 weight) of one local expert, fill
# both in place; called after the grouped layer is built, once per local expert.
ExpertInit = Callable[[object, int, torch.Tensor, torch.Tensor], None]


def grouped_expert_weights(module, local_index: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(fc1, fc2)`` weight of one local expert of a ``TEGroupedMLP``."""
    name = f"weight{local_index}"
    fc1, fc2 = getattr(module.linear_fc1, name, None), getattr(module.linear_fc2, name, None)
    if fc1 is None or fc2 is None:
        raise RuntimeError(
            f"TEGroupedMLP has no linear_fc1/linear_fc2.{name}: the grouped-GEMM layout that "
            f"mm1_megatron/compat/experts.py was written for ({_WRITTEN_FOR}) has changed"
        )
    return fc1, fc2


def grouped_mlp_with_expert_init(make_init: Callable[[], ExpertInit]) -> type:
    class InitialisedGroupedMLP(TEGroupedMLP):
        def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
            init_expert = make_init()
            super().__init__(
                num_local_experts, config, submodules, pg_collection=pg_collection, **kwargs
            )
            first_expert = self.ep_group.rank() * num_local_experts
            for local_index in range(num_local_experts):
                fc1, fc2 = grouped_expert_weights(self, local_index)
                init_expert(self.config, first_expert + local_index, fc1, fc2)

    return InitialisedGroupedMLP
