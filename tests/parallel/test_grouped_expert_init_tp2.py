"""``draw_expert_weights`` at expert tensor parallelism 2 gives each rank exactly the slices
its seeded ``SequentialMLP`` experts hold.

``tests/unit/test_grouped_expert_init.py`` checks the same in one process, where the
expert-TP rank owns the whole weight and how ``linear_fc1`` is split cannot matter. Here
two gloo processes (``parallel.tensor_parallel_size=2``; expert-TP follows TP) each build
the tiny MoE model and redraw every local expert into fresh tensors: the gated
``linear_fc1`` is split as Megatron-Core's ``MLP`` splits it (interleaved [gate, up]
chunks), ``linear_fc2`` by its input columns.

This file also holds the ranks' function: the test sends it to the session's rank pool.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
SEED = 7
# A rank left waiting in a collective fails after this long instead of the 30-minute default.
COLLECTIVE_TIMEOUT_MINUTES = 1.5
OVERRIDES = (
    "model.llm.moe.num_experts=4",
    "model.llm.moe.top_k=2",
    "parallel.tensor_parallel_size=2",
    "parallel.sequence_parallel=true",  # required for MoE with TP > 1
)


def test_expert_draw_equals_seeded_sequential_experts_at_expert_tp2():
    """``check_expert_draw`` on every rank of the session's pool of two (an assertion on
    any rank fails the test with that rank's traceback)."""
    from tests.rank_pool import session_pools

    target = "tests.parallel.test_grouped_expert_init_tp2:check_expert_draw"
    session_pools()(WORLD_SIZE).run(target, timeout=600)


def _compare_experts(model, keys) -> list:
    """Redraw every local expert of every MoE layer; the mismatches, named."""
    import torch
    from megatron.core import parallel_state

    from mm1_megatron.models import seeding

    layers = [
        layer.mlp.experts
        for layer in model.language_model.decoder.layers
        if hasattr(layer.mlp, "experts")
    ]
    assert len(layers) == len(keys) > 0, (len(layers), len(keys))
    config = model.language_model.config
    assert config.gated_linear_unit
    first_expert = parallel_state.get_expert_model_parallel_rank() * len(layers[0].local_experts)
    mismatches = []
    for layer_index, (layer_key, experts) in enumerate(zip(keys, layers)):
        for local_index, expert in enumerate(experts.local_experts):
            fc1 = torch.empty_like(expert.linear_fc1.weight)
            fc2 = torch.empty_like(expert.linear_fc2.weight)
            seeding.draw_expert_weights(config, layer_key, first_expert + local_index, fc1, fc2)
            for name, drawn, held in (
                ("linear_fc1", fc1, expert.linear_fc1.weight),
                ("linear_fc2", fc2, expert.linear_fc2.weight),
            ):
                if not torch.equal(drawn, held):
                    mismatches.append(f"MoE layer {layer_index} expert {local_index} {name}")
    return mismatches


def check_expert_draw() -> None:
    """On each rank of a world of ``WORLD_SIZE``: every expert's weights equal its seeded
    draw. Leaves the world group up (a rank pool runs it)."""
    sys.path.insert(0, str(REPO))
    from unittest import mock

    from megatron.core import parallel_state

    from mm1_megatron.models import build_mm1_model, seeding
    from mm1_megatron.parallel import init_distributed, seed_everything
    from mm1_megatron.parallel.collectives import all_gather_objects
    from tests.conftest import IMAGE_TOKEN_ID, make_tiny_config

    cfg = make_tiny_config(*OVERRIDES)
    init_distributed(cfg.parallel, timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES)
    rank = parallel_state.get_expert_tensor_parallel_rank()
    world = parallel_state.get_expert_tensor_parallel_world_size()
    # At expert-TP 1 every split of fc1 is the whole weight: the check would be vacuous.
    assert world == WORLD_SIZE, f"expert tensor parallel size {world}, expected {WORLD_SIZE}"
    keys = []
    original = seeding._draw_layer_key

    def recording():
        keys.append(original())
        return keys[-1]

    seed_everything(SEED)
    with mock.patch.object(seeding, "_draw_layer_key", recording):
        model = build_mm1_model(
            cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID, init_seed=SEED
        )
    # Every rank reports every rank's mismatches (torchrun stops the others at the first exit).
    mismatches = [
        f"expert-TP rank {r}: {m}"
        for r, found in enumerate(all_gather_objects(_compare_experts(model, keys)))
        for m in found
    ]
    del model
    parallel_state.destroy_model_parallel()
    assert not mismatches, "\n".join(mismatches)
    logging.getLogger(__name__).info("expert-TP rank %d/%d: grouped expert draw ok", rank, world)
