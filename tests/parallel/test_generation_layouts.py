"""Generation at every parallel layout gives the single-process tokens, token for token.

CPU, gloo, fp32; the model is built with ``init_seed``, so each layout holds the weights
of the single-process model without a checkpoint. ``generation_worker.py`` generates
greedy and 3-beam outputs for two groups of prompts (0-2 images, different lengths)
with the KV cache; every layout must return exactly the reference's ids:

- TP=2: attention heads, MLP and the vocabulary split over two ranks;
- PP=2, decoder layers split evenly (2 + 2) and unevenly (1 on the vision stage + 3):
  hidden states sent stage to stage, the last stage's decisions broadcast back;
- MoE with EP=2 (DP=2): each data-parallel rank holds a different group of prompts (5
  and 3), yet every MoE layer exchanges tokens across both, so they must step together.
  In the ``stopped`` runs rank 1's search is done after at most two steps while rank 0
  runs all ``MAX_NEW_TOKENS``: a rank that stopped stepping early would hang the other
  (the launch's timeout fails the test) or desynchronise the collectives;
- MoE with PP=2 (experts whole on each stage).

One launch per world size, several layouts per launch (start-up once).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.in_process import call_in_process
from tests.parallel.generation_worker import GROUP_SIZES, MAX_NEW_TOKENS, NUM_GROUPS
from tests.rank_pool import session_pools

MODES = ("greedy_free", "greedy_stopped", "beam3_free", "beam3_stopped")

MOE = ["model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2"]
PP2 = ["parallel.pipeline_parallel_size=2"]
REFERENCES = {"dense": [], "moe": MOE}

# name -> (reference, overrides); all on two processes
LAYOUTS = {
    "tp2": ("dense", ["parallel.tensor_parallel_size=2"]),
    "pp2_even_split": ("dense", PP2),
    "pp2_one_layer_on_vision_stage": (
        "dense",
        PP2 + ["parallel.num_decoder_layers_on_vision_stage=1"],
    ),
    "ep2_dp2_different_prompts": ("moe", MOE + ["parallel.expert_parallel_size=2"]),
    "moe_pp2": ("moe", MOE + PP2),
}


def _launch(world_size: int, layouts: dict, out_dir: Path) -> None:
    """``generation_worker.run_layouts``: the references in this process, the layouts on
    the session's rank pool (``tests/rank_pool.py``)."""
    spec = out_dir / f"spec_{world_size}.json"
    spec.write_text(json.dumps({"layouts": layouts}))
    if world_size == 1:
        from tests.parallel import generation_worker

        call_in_process(generation_worker.run_layouts, str(spec), str(out_dir))
        return
    target = "tests.parallel.generation_worker:run_layouts"
    session_pools()(world_size).run(target, str(spec), str(out_dir), timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("generation_layouts")
    _launch(1, REFERENCES, out_dir)
    _launch(2, {name: overrides for name, (_, overrides) in LAYOUTS.items()}, out_dir)
    return out_dir


def _load(out_dir: Path, name: str) -> dict:
    return json.loads((out_dir / f"{name}.json").read_text())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_generates_the_single_process_tokens(results, layout):
    reference_name, _ = LAYOUTS[layout]
    reference = _load(results, reference_name)["groups"]
    sharded = _load(results, layout)["groups"]
    assert sorted(sharded) == sorted(reference) == [str(g) for g in range(NUM_GROUPS)]
    for group in reference:
        assert sharded[group]["early_stop_ids"] == reference[group]["early_stop_ids"]
        for mode in MODES:
            assert sharded[group][mode] == reference[group][mode], f"group {group}, {mode}"


def test_expert_parallel_ranks_held_different_prompts(results):
    record = _load(results, "ep2_dp2_different_prompts")
    assert record["data_parallel_size"] == 2
    assert _load(results, "tp2")["data_parallel_size"] == 1


@pytest.mark.parametrize("reference", sorted(REFERENCES))
def test_the_references_exercise_what_the_layouts_are_compared_on(results, reference):
    """Rank 1's group finishes early while rank 0's runs to the end; beam search is not
    greedy; the groups differ in size."""
    groups = _load(results, reference)["groups"]
    first, second = groups["0"], groups["1"]
    assert [len(first["greedy_free"]), len(second["greedy_free"])] == list(GROUP_SIZES)
    assert second["early_stop_ids"], "no early stop token for group 1"
    assert max(len(out) for out in second["greedy_stopped"]) <= 1
    assert max(len(out) for out in first["greedy_stopped"]) == MAX_NEW_TOKENS
    assert max(len(out) for out in second["beam3_stopped"]) < MAX_NEW_TOKENS
    assert any(
        b != g
        for group in groups.values()
        for b, g in zip(group["beam3_free"], group["greedy_free"])
    )
