"""Balanced vision work: which data-parallel rank and micro-batch slot gets each sequence.

A *global batch* is the ``D x M x b`` consecutive global sequences a training step
consumes (``D`` data-parallel ranks, ``M`` micro-batches of ``b`` sequences each). Without
balancing, rank ``r`` takes every ``D``-th of them (``loader.py``). With balancing the set
stays exactly the same (so the per-token loss and its gradient are the same sum); only
the placement changes, by ``assign_global_batch``, a deterministic function of the
sequences' costs:

1. Form the ``D M`` micro-batches of ``b`` sequences with totals as even as longest
   processing time first (LPT) makes them: ``b`` rounds, each giving the ``D M`` heaviest
   remaining sequences to the micro-batches in order of their totals so far (heaviest to
   lightest). With ``b = 1`` a micro-batch is a sequence; with ``b > 1`` heavy sequences
   share a micro-batch with light ones, so the vision stage's micro-batches are alike.
2. Sort the micro-batches by cost and cut them into ``M`` *slot groups* of ``D``; group
   ``k`` goes to slot ``k`` of every rank, heaviest micro-batch to the least loaded rank
   (LPT under the constraint that every rank runs ``M`` micro-batches). The micro-batches
   that run in the same slot on different ranks are alike: what expert-parallel
   all-to-alls, which wait for every rank at each micro-batch, want.
3. Local search: swap a micro-batch of the most loaded rank with one of another rank
   while that lowers the largest total (``REFINE_ROUNDS`` swaps at most). This may move a
   micro-batch to another slot: rank balance comes first.
4. Order the slots of every rank the same way (``slot_order``).

Why not an exact partition: balanced partitioning is NP-hard, and this lands within a
small share of the mean at the shapes of a run (``docs/scaling.md``; the tests compare it
with a brute-force optimum). Each rank computes the costs of the sequences it would have
had without balancing, the ranks exchange them (one all-gather of a few integers per
sequence), and every rank runs the same assignment on the same numbers.

A sequence's cost is what varies between sequences of the same length:
``SequenceCost`` counts encoder inputs (images, or tiles), their patches at native
resolution, and the decoder's causal attention pairs; ``CostWeights`` turn the counts into
training FLOPs (built from the model config by the caller, as data never imports the
model's FLOP counts).
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

ALGORITHM = "even-micro-batches-lpt-v2"
REFINE_ROUNDS = 64
# The local search stops once the most loaded rank is within this share of the mean.
REFINE_TOLERANCE = 0.002
COST_SCALE = 2**30  # the largest sequence's integer cost (sums of 2^33 of them fit int64)
_NEVER = np.iinfo(np.int64).max
SLOT_ORDERS = ("spread", "heaviest_first", "alternate")
GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0  # 1 / phi


@dataclass(frozen=True)
class SequenceCost:
    """The counts that make one packed sequence cost more or less than another."""

    encoder_inputs: int  # images, or their tiles: what the ViT encodes
    patches: int  # native resolution: the inputs' patches (0 at a fixed image size)
    patch_pairs: int  # native resolution: sum of patches^2 over inputs (ViT attention)
    attention_pairs: int  # decoder: causal query-key pairs within each real document

    def as_row(self) -> List[int]:
        return list(astuple(self))

    @classmethod
    def from_row(cls, row: Sequence[int]) -> SequenceCost:
        return cls(*(int(value) for value in row))


NUM_COST_FIELDS = len(SequenceCost.__dataclass_fields__)


@dataclass(frozen=True)
class CostWeights:
    """Training FLOPs per unit of each ``SequenceCost`` count."""

    per_encoder_input: float  # ViT + connector per input at a fixed size (its class token too)
    per_patch: float = 0.0  # native resolution: the ViT's linear work per patch
    per_patch_pair: float = 0.0  # native resolution: ViT attention per patch pair
    per_attention_pair: float = 0.0  # decoder attention per causal pair

    def vision(self, costs: np.ndarray) -> np.ndarray:
        """Vision FLOPs of ``[n, NUM_COST_FIELDS]`` cost rows."""
        costs = np.asarray(costs, dtype=np.float64).reshape(-1, NUM_COST_FIELDS)
        return (
            costs[:, 0] * self.per_encoder_input
            + costs[:, 1] * self.per_patch
            + costs[:, 2] * self.per_patch_pair
        )

    def total(self, costs: np.ndarray) -> np.ndarray:
        """Vision plus decoder-attention FLOPs: the part of a sequence's work that varies."""
        costs = np.asarray(costs, dtype=np.float64).reshape(-1, NUM_COST_FIELDS)
        return self.vision(costs) + costs[:, 3] * self.per_attention_pair


def integer_costs(weights: CostWeights, rows: np.ndarray) -> np.ndarray:
    """Each row's ``weights.total`` as int64, scaled so that the largest is ``COST_SCALE``
    (any model's FLOPs keep ~9 significant digits). The floats come from element-wise
    operations and a max only (exactly rounded, so the same on every CPU); every sum after
    this is exact."""
    total = weights.total(rows)
    largest = float(total.max()) if total.size else 0.0
    if largest <= 0:
        return np.zeros(len(total), dtype=np.int64)
    return np.rint(total * (COST_SCALE / largest)).astype(np.int64)


def document_pairs(lengths: Sequence[int]) -> int:
    """Causal query-key pairs of documents of these lengths: ``sum L (L + 1) / 2``."""
    return int(sum(n * (n + 1) // 2 for n in lengths))


def cost_of_packed(
    num_real_tokens: int,
    document_ids: torch.Tensor,
    num_inputs: int,
    image_grids: Optional[torch.Tensor] = None,
) -> SequenceCost:
    """The cost of a built sequence (what ``sequence_cost`` of a builder predicts)."""
    real = document_ids[:num_real_tokens]
    lengths = torch.unique_consecutive(real, return_counts=True)[1].tolist() if len(real) else []
    patches, patch_pairs = grid_patches(image_grids)
    return SequenceCost(num_inputs, patches, patch_pairs, document_pairs(lengths))


def grid_patches(image_grids: Optional[torch.Tensor]) -> Tuple[int, int]:
    """``(patches, sum of patches^2)`` of ``[n, 2]`` patch grids (0, 0 for None)."""
    if image_grids is None or not len(image_grids):
        return 0, 0
    per_image = (image_grids[:, 0] * image_grids[:, 1]).long()
    return int(per_image.sum()), int((per_image * per_image).sum())


def cost_of_sequence(sequence) -> SequenceCost:
    """``cost_of_packed`` of a ``packing.PackedSequence``."""
    return cost_of_packed(
        sequence.num_real_tokens, sequence.document_ids, sequence.num_images, sequence.image_grids
    )


def slot_order(slot_costs: np.ndarray, rule: str) -> np.ndarray:
    """The order in which every rank runs its micro-batch slots, from the slots' costs
    (summed over ranks): ``spread`` (the slots' cost ranks ``j`` run in the order of
    ``frac(j / phi)``, Weyl's low-discrepancy sequence: consecutive positions take ranks a
    Fibonacci number apart, so every run of consecutive micro-batches mixes heavy and
    light ones in the proportions of the whole step), ``heaviest_first``, or ``alternate``
    (heaviest, lightest, second heaviest, ...)."""
    by_cost = np.lexsort((np.arange(len(slot_costs)), -np.asarray(slot_costs, dtype=np.float64)))
    if rule == "heaviest_first":
        return by_cost
    if rule == "spread":
        quantiles = (np.arange(len(by_cost)) * GOLDEN) % 1.0
        return by_cost[np.argsort(quantiles, kind="stable")]
    if rule == "alternate":
        order = np.empty_like(by_cost)
        order[0::2] = by_cost[: (len(by_cost) + 1) // 2]
        order[1::2] = by_cost[::-1][: len(by_cost) // 2]
        return order
    raise ValueError(f"unknown micro-batch order {rule!r}; expected one of {SLOT_ORDERS}")


def natural_assignment(dp_size: int, num_microbatches: int, micro_batch_size: int) -> np.ndarray:
    """``[D, M, b]`` offsets into the global batch without balancing: rank ``r``'s ``n``-th
    sequence is offset ``n D + r`` (``loader.py``)."""
    per_rank = num_microbatches * micro_batch_size
    n = np.arange(per_rank)
    offsets = n[None, :] * dp_size + np.arange(dp_size)[:, None]
    return offsets.reshape(dp_size, num_microbatches, micro_batch_size)


def assign_global_batch(
    costs: np.ndarray,
    *,
    dp_size: int,
    micro_batch_size: int,
    order: str = "spread",
) -> np.ndarray:
    """``[D, M, b]`` offsets into the global batch: rank ``r``'s micro-batch ``k`` holds the
    sequences at offsets ``result[r, k]`` (module docstring). ``costs``: one integer per
    sequence of the global batch, in global order (``integer_costs``: integer arithmetic
    gives every rank the same sums, and so the same assignment, on any CPU)."""
    costs = np.asarray(costs)
    if costs.dtype.kind not in "iu":
        raise ValueError(f"costs must be integers (integer_costs), got {costs.dtype}")
    costs = costs.astype(np.int64)
    if costs.ndim != 1 or len(costs) == 0 or len(costs) % (dp_size * micro_batch_size):
        raise ValueError(
            f"a global batch of {len(costs)} sequences does not split into data-parallel "
            f"size {dp_size} x micro-batches of {micro_batch_size}"
        )
    micro = _even_micro_batches(costs, len(costs) // micro_batch_size, micro_batch_size)
    micro_costs = costs[micro].sum(axis=1)
    num_slots = len(micro) // dp_size
    by_cost = np.lexsort((np.arange(len(micro)), -micro_costs))
    placed = np.empty((dp_size, num_slots), dtype=np.int64)
    totals = np.zeros(dp_size, dtype=np.int64)
    for slot, members in enumerate(by_cost.reshape(num_slots, dp_size)):
        ranks = np.argsort(totals, kind="stable")  # LPT: the heaviest to the least loaded
        placed[ranks, slot] = members
        totals[ranks] += micro_costs[members]
    _refine(placed, micro_costs, totals)
    slot_costs = micro_costs[placed].sum(axis=0)
    return micro[placed[:, slot_order(slot_costs, order)]]


def _even_micro_batches(costs: np.ndarray, num_micro: int, size: int) -> np.ndarray:
    """``[N, b]``: the sequences in ``N`` micro-batches of ``b`` with totals as even as
    LPT makes them (``b`` rounds; each gives its ``N`` heaviest remaining sequences to the
    micro-batches in order of their totals so far, the heaviest to the lightest)."""
    by_cost = np.lexsort((np.arange(len(costs)), -costs))
    micro = np.empty((num_micro, size), dtype=np.int64)
    totals = np.zeros(num_micro, dtype=np.int64)
    for round_index in range(size):
        taken = by_cost[round_index * num_micro : (round_index + 1) * num_micro]
        order = np.argsort(totals, kind="stable")
        micro[order, round_index] = taken
        totals[order] += costs[taken]
    return micro


def _refine(placed: np.ndarray, costs: np.ndarray, totals: np.ndarray) -> None:
    """Local search on the rank totals: swap a micro-batch of the most loaded rank with
    one of another rank, the swap that leaves the larger of the two totals smallest, while
    that is below the most loaded total (``REFINE_ROUNDS`` swaps at most; done once the
    most loaded is within ``REFINE_TOLERANCE`` of the mean)."""
    enough = totals.mean() * (1 + REFINE_TOLERANCE)
    held = costs[placed]  # [D, M], kept in step with ``placed``
    for _ in range(REFINE_ROUNDS):
        high = int(np.argmax(totals))
        top = totals[high]
        if top <= enough:
            return
        # delta[r, i, j]: cost moved off ``high`` by swapping its i-th with rank r's j-th.
        delta = held[high][None, :, None] - held[:, None, :]
        worst = np.maximum(top - delta, totals[:, None, None] + delta)
        worst[delta <= 0] = _NEVER  # also swaps inside ``high`` (they never lower it)
        best = int(np.argmin(worst))
        if worst.flat[best] >= top:
            return
        rank, i, j = np.unravel_index(best, delta.shape)
        moved = delta[rank, i, j]
        placed[high, i], placed[rank, j] = placed[rank, j], placed[high, i]
        held[high, i], held[rank, j] = held[rank, j], held[high, i]
        totals[high] -= moved
        totals[rank] += moved


def imbalance(per_rank: np.ndarray) -> float:
    """``max / mean`` of non-negative loads (1.0 when all are zero)."""
    per_rank = np.asarray(per_rank, dtype=np.float64)
    mean = per_rank.mean()
    return float(per_rank.max() / mean) if mean > 0 else 1.0


Exchange = Callable[[np.ndarray], np.ndarray]  # [n, F] local rows -> [D, n, F] in rank order
