"""A ``SequentialMLP`` that lets the caller act before each local expert is built.

Megatron-Core's ``SequentialMLP.__init__`` builds its local experts in one loop with no
hook, so a caller that must draw each expert from its own random stream (layout-invariant
initialisation, ``models/seeding.py``) needs that loop reproduced. This is the only copy,
checked against megatron-core 0.16.1 and 0.19.2: it asks the parent for zero experts and
appends ``MLP`` experts itself with the same arguments the parent would pass (0.19 also
passes a ``name``; detected from ``MLP``'s signature).
"""

from __future__ import annotations

import inspect
from typing import Callable

from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

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
