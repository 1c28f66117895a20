"""How evenly a run's data spreads its vision work, with and without balancing.

For each step of the configured data stream, the global batch's sequence costs
(``builder.sequence_cost``: images or tiles, native patches, the decoder's causal
attention pairs; nothing decoded) are placed as the loader would place them at ``D``
data-parallel ranks: naturally (rank ``r`` takes every ``D``-th sequence) and balanced
(``data/pipeline/balance.py``). Per placement and step:

- **per rank**: ``max / mean`` over ranks of the vision FLOPs (encoder and connector,
  training) of the rank's sequences, and of the varying work (vision plus decoder
  attention), which every rank waits for at the gradient reduction;
- **per micro-batch**: the seconds of each micro-batch on the vision stage (the encoder,
  the connector and the stage's decoder layers; the whole model without pipelining),
  ``max / mean`` over the ranks' micro-batches in the same slot (they meet at every
  expert-parallel all-to-all) and over each rank's own micro-batches (a heavy one holds
  the pipeline behind it);
- **step time**: ``mm1 estimate``'s stage-time model per micro-batch (affine in its
  images and attention pairs), run through the 1F1B schedule
  (``estimate/pipeline_schedule.py``) on every rank; the step takes the slowest rank,
  plus the data-parallel and optimizer time of the estimate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.data.pipeline.balance import (
    NUM_COST_FIELDS,
    CostWeights,
    assign_global_batch,
    imbalance,
    integer_costs,
    natural_assignment,
)
from mm1_megatron.scaling.estimate.estimator import Estimate
from mm1_megatron.scaling.estimate.pipeline_schedule import simulate_1f1b
from mm1_megatron.scaling.estimate.stages import pipeline_stages
from mm1_megatron.scaling.estimate.step_time import stage_time
from mm1_megatron.scaling.estimate.vision_stage import forward_backward

PLACEMENTS = ("natural", "balanced")
# Pairs per probe when measuring a stage's time per attention pair (any large count: the
# model is affine in pairs).
_PAIR_PROBE = 1_000_000


def global_batch_costs(cost_of: Callable[[int], object], first: int, size: int) -> np.ndarray:
    """``[size, F]`` cost rows of global sequences ``first .. first + size - 1``."""
    rows = [cost_of(first + i).as_row() for i in range(size)]
    return np.array(rows, dtype=np.int64).reshape(size, NUM_COST_FIELDS)


def place(
    costs: np.ndarray,
    weights: CostWeights,
    *,
    placement: str,
    dp_size: int,
    micro_batch_size: int,
    order: str = "spread",
) -> np.ndarray:
    """``[D, M, b]`` offsets into the global batch, as the loader places them."""
    num_micro = len(costs) // (dp_size * micro_batch_size)
    if placement == "natural":
        return natural_assignment(dp_size, num_micro, micro_batch_size)
    return assign_global_batch(
        integer_costs(weights, costs),
        dp_size=dp_size,
        micro_batch_size=micro_batch_size,
        order=order,
    )


@dataclass
class StageModel:
    """Seconds of one micro-batch on each stage, affine in its images and pairs:
    ``base[s] + images x per_image[s] + pairs x per_pair[s]`` (forward and backward)."""

    base: np.ndarray  # [P, 2]
    per_image: np.ndarray  # [P, 2]
    per_pair: np.ndarray  # [P, 2]
    send_seconds: float

    @classmethod
    def of(cls, cfg: MM1Config, estimate: Estimate, efficiency: float) -> StageModel:
        m, b = estimate.step.num_microbatches, cfg.training.micro_batch_size
        stages = pipeline_stages(cfg, m)
        recompute, dp = cfg.parallel.recompute, estimate.layout.dp

        def seconds(images_per_sequence: float, pairs_per_sequence: int) -> np.ndarray:
            w = dataclasses.replace(
                estimate.workload,
                images_per_sequence=images_per_sequence,
                attention_pairs_per_sequence=pairs_per_sequence,
            )
            return np.array(
                [
                    forward_backward(
                        stage_time(cfg, w, s, gpu=estimate.gpu, efficiency=efficiency, dp=dp),
                        recompute,
                    )
                    for s in stages
                ]
            )

        base = seconds(0.0, 0)
        # Per micro-batch totals: a micro-batch of b sequences with I images and Q pairs
        # has I / b images and Q / b pairs per sequence.
        per_image = (seconds(1.0, 0) - base) / b
        per_pair = (seconds(0.0, _PAIR_PROBE) - base) / _PAIR_PROBE / b
        return cls(base, per_image, per_pair, estimate.step.stages[0].pipeline_send / 2)

    def vision_stage_seconds(self, images: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Forward + backward seconds on stage 0 of micro-batches with these totals."""
        per_pass = (
            self.base[0]
            + images[..., None] * self.per_image[0]
            + (pairs[..., None] * self.per_pair[0])
        )
        return per_pass.sum(axis=-1)

    def pipeline_seconds(self, images: np.ndarray, pairs: np.ndarray) -> float:
        """1F1B seconds of one rank whose micro-batches hold ``images[k]`` images (tiles)
        and ``pairs[k]`` attention pairs, in that order."""
        times = (
            self.base[:, None, :]
            + images[None, :, None] * self.per_image[:, None, :]
            + pairs[None, :, None] * self.per_pair[:, None, :]
        )
        return simulate_1f1b(times[..., 0], times[..., 1], send_seconds=self.send_seconds)


@dataclass
class PlacementFigures:
    rank_vision: List[float] = field(default_factory=list)  # per step
    rank_varying: List[float] = field(default_factory=list)  # per step
    slot_stage: List[float] = field(default_factory=list)  # per step and slot, over ranks
    rank_stage: List[float] = field(default_factory=list)  # per step and rank, over slots
    step_seconds: List[float] = field(default_factory=list)  # per step


def measure_step(
    costs: np.ndarray,
    weights: CostWeights,
    figures: Dict[str, PlacementFigures],
    *,
    dp_size: int,
    micro_batch_size: int,
    order: str,
    stage_model: Optional[StageModel],
    fixed_seconds: float,
) -> None:
    """Add one global batch's figures for every placement to ``figures``."""
    vision, varying = weights.vision(costs), weights.total(costs)
    images, pairs = costs[:, 0].astype(np.float64), costs[:, 3].astype(np.float64)
    for placement in PLACEMENTS:
        placed = place(
            costs,
            weights,
            placement=placement,
            dp_size=dp_size,
            micro_batch_size=micro_batch_size,
            order=order,
        )
        out = figures[placement]
        out.rank_vision.append(imbalance(vision[placed].sum(axis=(1, 2))))
        out.rank_varying.append(imbalance(varying[placed].sum(axis=(1, 2))))
        if stage_model is not None:
            stage = stage_model.vision_stage_seconds(
                images[placed].sum(axis=2), pairs[placed].sum(axis=2)
            )  # [D, M]
            out.slot_stage += [imbalance(stage[:, k]) for k in range(stage.shape[1])]
            out.rank_stage += [imbalance(stage[r]) for r in range(dp_size)]
            per_rank = [
                stage_model.pipeline_seconds(
                    images[placed[r]].sum(axis=1), pairs[placed[r]].sum(axis=1)
                )
                for r in range(dp_size)
            ]
            out.step_seconds.append(max(per_rank) + fixed_seconds)


def summarize(values: List[float]) -> Dict[str, float]:
    """Median, 90th percentile, max and mean of per-step (or per-slot) figures."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {}
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": float(a.max()),
        "mean": float(a.mean()),
    }


def image_histogram(costs: np.ndarray) -> Dict[str, int]:
    """Sequences per count of encoder inputs (images or tiles): ``mm1 estimate
    --images-distribution``'s input."""
    values, counts = np.unique(costs[:, 0], return_counts=True)
    return {str(int(v)): int(n) for v, n in zip(values, counts)}
