"""Balanced placement (``data/pipeline/balance.py``) and the loader that plans with it.

The assignment is checked against a brute-force search of every balanced partition of
small global batches; the loader with simulated data-parallel ranks (threads exchanging
their cost rows, as the all-gather does) against the unbalanced loader: the same global
batches at every step, exact resume mid-step, and the same global batches after a change
of data-parallel size. Planned costs are checked against the built sequences.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from mm1_megatron.config import load_config
from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.pipeline import balance
from mm1_megatron.data.pipeline.balance import (
    CostWeights,
    assign_global_batch,
    cost_of_sequence,
    imbalance,
    integer_costs,
    natural_assignment,
    slot_order,
)
from mm1_megatron.data.pipeline.loader import Balancing, MicroBatchLoader
from mm1_megatron.training.flops import balance_weights

REPO_CONFIGS = "configs"


def _mm1_like_costs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Images per sequence as MM1's mixture gives them: text 0, interleaved 1-16 (mostly
    few), caption sequences full; plus a small attention-dependent part."""
    kind = rng.choice(3, size=n, p=[0.1, 0.45, 0.45])
    images = np.where(kind == 0, 0, np.where(kind == 1, rng.geometric(0.3, n).clip(1, 16), 16))
    return (images * 100 + rng.integers(0, 20, n)).astype(np.int64)


# ---- the assignment ---------------------------------------------------------------------
@pytest.mark.parametrize("dp, micro, slots", [(2, 1, 4), (4, 2, 3), (8, 1, 8), (3, 2, 5)])
def test_assignment_places_every_sequence_once(dp, micro, slots):
    costs = _mm1_like_costs(np.random.default_rng(dp * 100 + slots), dp * micro * slots)
    placed = assign_global_batch(costs, dp_size=dp, micro_batch_size=micro)
    assert placed.shape == (dp, slots, micro)
    assert sorted(placed.ravel().tolist()) == list(range(len(costs)))
    again = assign_global_batch(costs.copy(), dp_size=dp, micro_batch_size=micro)
    np.testing.assert_array_equal(placed, again)  # deterministic


def test_slot_groups_hold_sequences_of_neighbouring_cost(monkeypatch):
    """Before the local search, slot k of every rank holds the k-th group of the
    cost-sorted batch: a slot's micro-batches are alike across ranks. The search moves a
    few (rank balance first); slots stay far more alike than placed naturally."""
    costs = _mm1_like_costs(np.random.default_rng(0), 64)
    monkeypatch.setattr(balance, "REFINE_ROUNDS", 0)
    placed = assign_global_batch(costs, dp_size=8, micro_batch_size=1, order="heaviest_first")
    ranked = np.sort(costs)[::-1].reshape(8, 8)
    for slot in range(8):
        np.testing.assert_array_equal(np.sort(costs[placed[:, slot, 0]])[::-1], ranked[slot])
    monkeypatch.undo()
    refined = costs[assign_global_batch(costs, dp_size=8, micro_batch_size=1)][..., 0]
    natural = costs[natural_assignment(8, 8, 1)][..., 0]

    def slot_spread(per_slot):  # [D, M] -> mean over slots of (max / mean over ranks) - 1
        return np.mean([imbalance(per_slot[:, k] + 1.0) - 1 for k in range(per_slot.shape[1])])

    assert slot_spread(refined) < 0.5 * slot_spread(natural)


def test_micro_batches_of_several_sequences_are_even():
    """b > 1: heavy sequences share micro-batches with light ones, so the micro-batch
    totals end within one sequence's cost of each other."""
    rng = np.random.default_rng(5)
    costs = _mm1_like_costs(rng, 4 * 8 * 4)
    totals = costs[assign_global_batch(costs, dp_size=4, micro_batch_size=4)].sum(axis=2)
    natural = costs[natural_assignment(4, 8, 4)].sum(axis=2)
    assert np.ptp(totals) <= costs.max()
    assert np.ptp(totals) < 0.25 * np.ptp(natural)


def _best_partition_max(costs: np.ndarray, dp: int) -> float:
    """Brute force: the least possible largest rank total over every split of the costs
    into ``dp`` equal-sized ranks."""
    n = len(costs)
    per_rank = n // dp
    best = np.inf

    def search(remaining: tuple, worst: float, ranks_left: int):
        nonlocal best
        if worst >= best:
            return
        if ranks_left == 1:
            best = min(best, max(worst, costs[list(remaining)].sum()))
            return
        first, rest = remaining[0], remaining[1:]
        for others in itertools.combinations(rest, per_rank - 1):
            chosen = (first, *others)
            left = tuple(i for i in rest if i not in others)
            search(left, max(worst, costs[list(chosen)].sum()), ranks_left - 1)

    search(tuple(range(n)), 0.0, dp)
    return best


def test_assignment_is_close_to_the_best_partition():
    """Against a brute-force search over all balanced splits: the largest rank total is
    within the cost of one sequence of the optimum (the bound of greedy LPT), and far
    better than the natural placement on average."""
    rng = np.random.default_rng(7)
    gaps, natural_gaps = [], []
    for _ in range(25):
        dp, micro, slots = 3, 1, 4
        costs = _mm1_like_costs(rng, dp * micro * slots)
        placed = assign_global_batch(costs, dp_size=dp, micro_batch_size=micro)
        ours = costs[placed].sum(axis=(1, 2)).max()
        natural = costs[natural_assignment(dp, slots, micro)].sum(axis=(1, 2)).max()
        best = _best_partition_max(costs, dp)
        assert best <= ours <= best + costs.max()
        gaps.append(ours / best)
        natural_gaps.append(natural / best)
    assert np.mean(gaps) < 1.05 < np.mean(natural_gaps)


def test_rank_totals_end_within_one_sequence_of_each_other():
    rng = np.random.default_rng(3)
    for dp, micro, slots in [(8, 1, 64), (64, 1, 8), (16, 2, 16)]:
        costs = _mm1_like_costs(rng, dp * micro * slots)
        totals = costs[assign_global_batch(costs, dp_size=dp, micro_batch_size=micro)].sum(
            axis=(1, 2)
        )
        assert totals.max() - totals.min() <= costs.max()


def test_slot_orders():
    costs = np.array([5.0, 1.0, 9.0, 3.0, 7.0])
    np.testing.assert_array_equal(slot_order(costs, "heaviest_first"), [2, 4, 0, 3, 1])
    np.testing.assert_array_equal(slot_order(costs, "alternate"), [2, 1, 4, 3, 0])
    spread = slot_order(np.arange(13.0), "spread")
    assert sorted(spread.tolist()) == list(range(13))
    # Every run of 4 consecutive micro-batches spans the cost order (no two heavy ones
    # together): within 4 positions the ranks spread by at least 2.
    assert all(np.ptp(spread[i : i + 4]) >= 6 for i in range(10))
    with pytest.raises(ValueError, match="micro-batch order"):
        slot_order(costs, "random")


def test_bad_global_batch_is_refused():
    with pytest.raises(ValueError, match="does not split"):
        assign_global_batch(np.ones(6, dtype=np.int64), dp_size=4, micro_batch_size=1)


def test_imbalance():
    assert imbalance([1.0, 1.0, 4.0]) == 2.0
    assert imbalance([0.0, 0.0]) == 1.0


# ---- planned costs equal built sequences ---------------------------------------------------
COST_CASES = {
    "fixed": ("debug.yaml", []),
    "conversations": ("debug_sft.yaml", []),
    "static_tiles": ("debug.yaml", ["data.tiling.mode=static", "data.tiling.tile_size=32"]),
    "dynamic_tiles": (
        "debug.yaml",
        ["data.tiling.mode=dynamic", "data.tiling.tile_size=32", "training.seq_length=512"],
    ),
    "native_resolution": ("debug_siglip2_naflex.yaml", []),
}


@pytest.mark.parametrize("case", sorted(COST_CASES))
def test_synthetic_sequence_cost_equals_the_built_sequence(case):
    name, overrides = COST_CASES[case]
    cfg = load_config(f"{REPO_CONFIGS}/{name}", overrides)
    builder = build_run_data(cfg)[0].builder
    costs = [builder.sequence_cost(g) for g in range(24)]
    assert costs == [cost_of_sequence(builder.sequence(g)[0]) for g in range(24)]
    assert any(c.encoder_inputs for c in costs) and any(c.attention_pairs for c in costs)
    if case == "native_resolution":
        assert all(c.patches > 0 for c in costs if c.encoder_inputs)


def test_balance_weights_are_the_flop_counts():
    from mm1_megatron.training import flops

    cfg = load_config(f"{REPO_CONFIGS}/debug.yaml")
    w = balance_weights(cfg.model)
    per_image = flops.vision_encoder_forward_flops(cfg.model) + flops.connector_forward_flops(
        cfg.model
    )
    assert w.per_encoder_input == 3 * per_image
    assert w.per_attention_pair == 3 * flops.decoder_attention_forward_flops(cfg.model, 1)


# ---- the loader with simulated ranks -------------------------------------------------------
class _ThreadAllGather:
    """The data-parallel all-gather for ranks simulated by threads."""

    def __init__(self, size: int):
        self.barrier, self.rows = threading.Barrier(size), [None] * size

    def for_rank(self, rank: int):
        def exchange(rows: np.ndarray) -> np.ndarray:
            self.rows[rank] = rows
            self.barrier.wait()
            gathered = np.stack(self.rows)
            self.barrier.wait()
            return gathered

        return exchange


@pytest.fixture(scope="module")
def builder_and_tokenizer():
    loader, tokenizer = build_run_data(load_config(f"{REPO_CONFIGS}/debug.yaml"))
    return loader.builder, tokenizer


def _loaders(builder, tokenizer, dp, *, micro, num_micro, balanced=True):
    gather = _ThreadAllGather(dp)
    weights = CostWeights(per_encoder_input=100.0, per_attention_pair=0.01)
    return [
        MicroBatchLoader(
            builder,
            tokenizer=tokenizer,
            micro_batch_size=micro,
            seed=1234,
            dp_rank=rank,
            dp_size=dp,
            balancing=Balancing(num_micro, weights, gather.for_rank(rank)) if balanced else None,
        )
        for rank in range(dp)
    ]


def _run(loaders, num_batches):
    """Every rank's next ``num_batches`` micro-batches, the ranks in threads."""
    results = [None] * len(loaders)

    def work(rank):
        results[rank] = [next(loaders[rank]) for _ in range(num_batches)]

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(loaders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _step_rows(per_rank, num_micro, step):
    """The token rows of one step over all ranks, as a sorted list (a multiset)."""
    rows = []
    for batches in per_rank:
        for batch in batches[step * num_micro : (step + 1) * num_micro]:
            rows += [tuple(row.tolist()) for row in batch["tokens"]]
    return sorted(rows)


def test_balanced_steps_consume_the_same_global_batches(builder_and_tokenizer):
    builder, tokenizer = builder_and_tokenizer
    dp, micro, num_micro, steps = 4, 2, 2, 3
    balanced = _run(_loaders(builder, tokenizer, dp, micro=micro, num_micro=num_micro), 6)
    natural = _run(
        _loaders(builder, tokenizer, dp, micro=micro, num_micro=num_micro, balanced=False), 6
    )
    moved = False
    for step in range(steps):
        assert _step_rows(balanced, num_micro, step) == _step_rows(natural, num_micro, step)
        moved |= any(
            not torch.equal(b[step * num_micro]["tokens"], n[step * num_micro]["tokens"])
            for b, n in zip(balanced, natural)
        )
    assert moved  # the placement did change


def test_balanced_rank_loads_are_closer(builder_and_tokenizer):
    builder, tokenizer = builder_and_tokenizer
    dp, micro, num_micro = 4, 1, 4
    spreads = {}
    for balanced in (True, False):
        per_rank = _run(
            _loaders(builder, tokenizer, dp, micro=micro, num_micro=num_micro, balanced=balanced),
            num_micro * 3,
        )
        images = np.array([[int(b["num_images"].sum()) for b in batches] for batches in per_rank])
        step_loads = images.reshape(dp, 3, num_micro).sum(axis=2)  # [rank, step]
        spreads[balanced] = max(imbalance(step_loads[:, s]) for s in range(3))
    assert spreads[True] < spreads[False]


def _equal_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("consumed", [2, 3])  # a step boundary, and inside a step
def test_balanced_resume_continues_exactly(builder_and_tokenizer, consumed):
    builder, tokenizer = builder_and_tokenizer
    dp, micro, num_micro = 2, 2, 2
    uninterrupted = _run(_loaders(builder, tokenizer, dp, micro=micro, num_micro=num_micro), 6)
    first = _loaders(builder, tokenizer, dp, micro=micro, num_micro=num_micro)
    _run(first, consumed)
    resumed = _loaders(builder, tokenizer, dp, micro=micro, num_micro=num_micro)
    for old, new in zip(first, resumed):
        state = old.state_dict()
        assert state["balance"]["algorithm"] and state["balance"]["num_microbatches"] == 2
        new.load_state_dict(state)
    for full, rest in zip(uninterrupted, _run(resumed, 6 - consumed)):
        _equal_batches(full[consumed:], rest)


def test_resume_at_another_dp_size_keeps_the_global_batches(builder_and_tokenizer):
    """DP=2 (2 micro-batches of 2 per rank) for two steps, then DP=4 (1 micro-batch of 2):
    every later step holds the sequences of the uninterrupted DP=2 run's step."""
    builder, tokenizer = builder_and_tokenizer
    uninterrupted = _run(_loaders(builder, tokenizer, 2, micro=2, num_micro=2), 8)
    first = _loaders(builder, tokenizer, 2, micro=2, num_micro=2)
    _run(first, 4)
    wider = _loaders(builder, tokenizer, 4, micro=2, num_micro=1)
    for loader in wider:
        loader.load_state_dict(first[0].state_dict())
    continued = _run(wider, 2)
    for step in range(2):
        assert _step_rows(continued, 1, step) == _step_rows(uninterrupted, 2, step + 2)


def test_a_builder_without_costs_cannot_balance(builder_and_tokenizer):
    _, tokenizer = builder_and_tokenizer

    class NoCosts:
        def sequence(self, index):
            raise AssertionError

    with pytest.raises(ValueError, match="cannot plan balanced batches"):
        MicroBatchLoader(
            NoCosts(),
            tokenizer=tokenizer,
            micro_batch_size=1,
            seed=0,
            balancing=Balancing(1, CostWeights(1.0)),
        )


def test_a_state_saved_inside_a_balanced_step_continues_only_with_the_same_placement(
    builder_and_tokenizer,
):
    """The sequences consumed part-way through a balanced step are spread over the whole
    global batch: another DP size or other settings could repeat and skip sequences, so
    such a resume is refused (the trainer saves at step boundaries only)."""
    builder, tokenizer = builder_and_tokenizer
    first = _loaders(builder, tokenizer, 2, micro=2, num_micro=2)
    _run(first, 1)  # one micro-batch into the first step
    state = first[0].state_dict()
    for other in (
        _loaders(builder, tokenizer, 4, micro=2, num_micro=1)[0],
        _loaders(builder, tokenizer, 2, micro=2, num_micro=2, balanced=False)[0],
    ):
        with pytest.raises(ValueError, match="into a balanced step"):
            other.load_state_dict(state)
    broken = dict(state, num_sequences_consumed=3)
    with pytest.raises(ValueError, match="whole number of micro-batches"):
        _loaders(builder, tokenizer, 2, micro=2, num_micro=2)[0].load_state_dict(broken)


def test_costs_must_be_integers():
    """Integer costs keep every sum exact, so every rank computes the same assignment."""
    with pytest.raises(ValueError, match="must be integers"):
        assign_global_batch(np.ones(4), dp_size=2, micro_batch_size=1)
    weights = CostWeights(per_encoder_input=3.3e12, per_attention_pair=4.5e6)
    rows = np.array([[16, 0, 0, 50_000], [0, 0, 0, 8_390_656]])
    costs = integer_costs(weights, rows)
    assert costs.dtype == np.int64 and costs.max() == balance.COST_SCALE
    totals = weights.total(rows)
    np.testing.assert_allclose(costs / costs.max(), totals / totals.max(), rtol=1e-8)
    assert not integer_costs(weights, np.zeros((3, 4))).any()
