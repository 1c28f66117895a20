"""How many decoder layers the vision stage should hold (``parallel.
num_decoder_layers_on_vision_stage``) for the config's own layout, when PP > 1.

Stage 0 runs the ViT and the connector before its decoder layers, so its time per
micro-batch follows that micro-batch's images while the other stages' does not. For every
candidate count (the last stage keeps its configured count and the middle stages share the
rest evenly, as ``layouts.pipeline_splits`` requires; with PP = 2 the last stage takes the
rest) the 1F1B schedule is simulated exactly (``pipeline_schedule.simulate_1f1b``) with
each micro-batch's own vision-stage time, and the step is that pipeline time plus the
exposed data-parallel communication and the optimizer step (``step_time.py``). The best
candidate that fits in memory (sized, as everywhere, for the worst micro-batch) is
recommended.

The micro-batches' images come from ``--images-distribution``: ``ImageCounts.draw`` gives
the M micro-batches of one data-parallel rank the distribution's evenly spaced quantiles
in a fixed interleaved order (deterministic, so the recommendation is reproducible and
testable, and spread like a shuffled stream). Without a distribution every micro-batch
has the workload's images (the cap, or ``--images-per-sequence``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.scaling.estimate.estimator import Estimate, estimate_config, gib
from mm1_megatron.scaling.estimate.hardware import GpuType
from mm1_megatron.scaling.estimate.image_counts import ImageCounts
from mm1_megatron.scaling.estimate.pipeline_schedule import simulate_1f1b
from mm1_megatron.scaling.estimate.stages import pipeline_stages
from mm1_megatron.scaling.estimate.step_time import StageTime, stage_time
from mm1_megatron.scaling.estimate.workload import Workload


@dataclass(frozen=True)
class SplitTime:
    vision_stage_layers: int
    last_stage_layers: Optional[int]  # None: shares the rest with the middle stages
    stage_layers: Tuple[int, ...]
    pipeline_seconds: float  # 1F1B, simulated
    step_seconds: float  # + exposed data-parallel communication + optimizer step
    peak_memory_bytes: float
    fits: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "stage_layers": list(self.stage_layers)}


@dataclass(frozen=True)
class VisionStageAdvice:
    configured: SplitTime
    best: SplitTime  # the fastest that fits (the fastest of all when none fits)
    candidates: List[SplitTime]
    micro_batch_images: List[float]  # images per sequence of each micro-batch, in order
    from_distribution: bool

    def to_dict(self) -> dict:
        return {
            "configured": self.configured.to_dict(),
            "best": self.best.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "num_microbatches": len(self.micro_batch_images),
            "micro_batch_images_per_sequence": self.micro_batch_images,
            "images_from": "distribution" if self.from_distribution else "workload",
        }

    def describe(self) -> List[str]:
        m = len(self.micro_batch_images)
        source = (
            "each with its own images, from the distribution's quantiles"
            if self.from_distribution
            else "all with the workload's images"
        )
        lines = [
            f"Vision-stage decoder layers (parallel.num_decoder_layers_on_vision_stage), "
            f"1F1B simulated over {m} micro-batches {source}; best: the fastest that fits:"
        ]
        for name, s in (("configured", self.configured), ("best", self.best)):
            lines.append(
                f"  {name:<10} {s.vision_stage_layers:>3} layers (stages "
                f"{'/'.join(map(str, s.stage_layers))}): pipeline {s.pipeline_seconds:.2f} s, "
                f"step {s.step_seconds:.2f} s, peak {gib(s.peak_memory_bytes):.1f} GiB"
                f"{'' if s.fits else ' (does not fit)'}"
            )
        return lines


def vision_stage_candidates(
    num_layers: int, pp: int, last: Optional[int]
) -> List[Tuple[int, Optional[int]]]:
    """``(vision stage, last stage)`` layer counts to try: the last stage's count kept
    (pinned or sharing evenly with the middle stages), every middle stage at least one
    layer; with PP = 2 and a pinned last stage, the last stage takes the rest."""
    out: List[Tuple[int, Optional[int]]] = []
    for first in range(1, num_layers):
        if pp == 2:
            out.append((first, None if last is None else num_layers - first))
            continue
        free = pp - 1 if last is None else pp - 2
        rest = num_layers - first - (last or 0)
        if rest >= free and rest % free == 0:
            out.append((first, last))
    return out


def forward_backward(t: StageTime, recompute: str) -> Tuple[float, float]:
    """A stage time's forward and backward parts: TP collectives split by pass (forward,
    backward and, with full recomputation, the recomputed forward), MoE all-to-alls half
    and half (dispatch and combine each way); the pipeline send is the simulation's."""
    passes = 3 if recompute == "full" else 2
    forward = t.forward + t.tensor_parallel / passes + t.expert_parallel / 2
    backward = t.backward + t.tensor_parallel * (passes - 1) / passes + t.expert_parallel / 2
    return forward, backward


def with_split(cfg: MM1Config, first: Optional[int], last: Optional[int]) -> MM1Config:
    par = dataclasses.replace(
        cfg.parallel,
        num_decoder_layers_on_vision_stage=first,
        num_decoder_layers_on_last_stage=last,
    )
    return dataclasses.replace(cfg, parallel=par)


def simulate_split(
    cfg: MM1Config, estimate: Estimate, micro_batch_images: List[float], efficiency: float
) -> SplitTime:
    """The 1F1B step of ``cfg`` (its split; ``estimate`` is its estimate) with micro-batch
    ``k``'s vision stage at ``micro_batch_images[k]`` images per sequence."""
    step = estimate.step
    m, recompute = step.num_microbatches, cfg.parallel.recompute
    stages = pipeline_stages(cfg, m)
    shape = (len(stages), m)
    forward, backward = np.empty(shape), np.empty(shape)
    for s, t in enumerate(step.stages):
        forward[s], backward[s] = forward_backward(t, recompute)
    vision: Dict[float, Tuple[float, float]] = {}
    for k, images in enumerate(micro_batch_images):
        if images not in vision:
            w = dataclasses.replace(estimate.workload, images_per_sequence=images)
            dp = estimate.layout.dp
            t = stage_time(cfg, w, stages[0], gpu=estimate.gpu, efficiency=efficiency, dp=dp)
            vision[images] = forward_backward(t, recompute)
        forward[0, k], backward[0, k] = vision[images]
    pipeline = simulate_1f1b(forward, backward, send_seconds=step.stages[0].pipeline_send / 2)
    return SplitTime(
        vision_stage_layers=len(stages[0].decoder_layers),
        last_stage_layers=cfg.parallel.num_decoder_layers_on_last_stage,
        stage_layers=tuple(len(s.decoder_layers) for s in stages),
        pipeline_seconds=pipeline,
        step_seconds=pipeline + step.data_parallel_exposed + step.optimizer,
        peak_memory_bytes=estimate.memory.peak,
        fits=estimate.fits,
    )


def micro_batch_images(
    images: Optional[ImageCounts], workload: Workload, num_microbatches: int, micro: int
) -> List[float]:
    """Images per sequence of each micro-batch: drawn from ``images``, or the workload's."""
    if images is None:
        return [float(workload.images_per_sequence)] * num_microbatches
    return [total / micro for total in images.draw(num_microbatches, micro)]


def recommend_vision_stage(
    cfg: MM1Config,
    *,
    num_gpus: int,
    gpu: GpuType,
    workload: Workload,
    memory_workload: Optional[Workload] = None,
    images: Optional[ImageCounts] = None,
    efficiency: float,
    memory_margin: float,
) -> Optional[VisionStageAdvice]:
    """The vision-stage layer count with the fastest simulated step for ``cfg``'s layout
    on ``num_gpus`` GPUs (which must be valid), or None with PP = 1."""
    par = cfg.parallel
    if par.pipeline_parallel_size == 1:
        return None
    knobs = dict(
        num_gpus=num_gpus,
        gpu=gpu,
        workload=workload,
        memory_workload=memory_workload,
        efficiency=efficiency,
        memory_margin=memory_margin,
    )
    configured = estimate_config(cfg, **knobs)
    draws = micro_batch_images(
        images, workload, configured.step.num_microbatches, cfg.training.micro_batch_size
    )
    candidates = []
    layers = cfg.model.llm.num_layers
    last = par.num_decoder_layers_on_last_stage
    for first, last_count in vision_stage_candidates(layers, par.pipeline_parallel_size, last):
        candidate = with_split(cfg, first, last_count)
        estimate = estimate_config(candidate, **knobs)
        candidates.append(simulate_split(candidate, estimate, draws, efficiency))
    fitting = [c for c in candidates if c.fits] or candidates
    return VisionStageAdvice(
        configured=simulate_split(cfg, configured, draws, efficiency),
        best=min(fitting, key=lambda c: c.step_seconds),
        candidates=candidates,
        micro_batch_images=draws,
        from_distribution=images is not None,
    )
