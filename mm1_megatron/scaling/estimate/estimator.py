"""``mm1 estimate``'s model: parameters, FLOPs, memory per GPU and step time for a config
and a layout, and the valid layouts for a GPU count ranked by estimated step time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.models.param_count import count_parameters
from mm1_megatron.scaling.estimate.compute import FlopsBreakdown, flops_per_sequence
from mm1_megatron.scaling.estimate.hardware import GpuType
from mm1_megatron.scaling.estimate.layouts import Layout, apply_layout, layout_error, valid_layouts
from mm1_megatron.scaling.estimate.memory import MemoryEstimate, estimate_memory
from mm1_megatron.scaling.estimate.stages import Stage
from mm1_megatron.scaling.estimate.step_time import (
    StepTime,
    estimate_step_time,
    num_microbatches,
    pipeline_seconds,
    stage_time,
)
from mm1_megatron.scaling.estimate.workload import Workload

DEFAULT_EFFICIENCY = 0.6  # share of the dense BF16 peak the matmuls reach
DEFAULT_MEMORY_MARGIN = 0.10  # of device memory kept free: allocator, CUDA context, NCCL
SPLITS_TRIED = 16  # pipeline splits fully estimated per layout (fastest first)

ASSUMPTIONS = (
    "bf16 weights and activations; fp32 gradient buffers (grad_reduce_in_fp32); fp32 master "
    "weights and Adam moments (12 B/parameter), sharded over DP with the distributed "
    "optimizer (expert parameters over the expert-data-parallel group)",
    "activations are what the code keeps for backward, per layer: norm inputs, QKV and fc1 "
    "inputs, the fused QKV output plus RoPE's rotated Q/K, the attention output (twice on "
    "the local per-document path), fc1's 2f-wide output and fc2's input (fused SwiGLU); "
    "flash attention for the decoder (fp32 log-sum-exp only); the ViT's attention "
    "probabilities are kept with transformer_impl=local (Megatron-Core's local attention), "
    "not with transformer_engine; model.transformer_impl=auto is estimated as "
    "transformer_engine, what it resolves to on a GPU with Transformer Engine installed",
    "sequence parallelism splits the norm and linear inputs over TP; the ViT and the "
    "connector run without SP, the connector replicated on every TP rank",
    "selective recomputation drops core attention's own tensors (probabilities, log-sum-exp, "
    "the kernel's output copy); full recomputation keeps each layer's input, plus one "
    "recomputed layer during backward",
    "1F1B pipeline: stage i holds min(m, PP - i) micro-batches; stage 0 holds the ViT, "
    "connector and embedding, the last stage the output layer and the fp32 logits of one "
    "micro-batch (Megatron-Core's vocab-parallel cross-entropy keeps an fp32 softmax)",
    "memory is sized for the worst micro-batch: every sequence at the image cap "
    "(data.max_images_per_sequence, in tiles, at most seq_length / num_output_tokens), one "
    "document per sequence; FLOPs and step time take the same images per sequence, or "
    "--images-per-sequence, or the mean of --images-distribution",
    "transients at the peak: the MLP gradients of one layer, a bf16 copy of the logits, the "
    "gradient of the largest weight; a layout fits when the peak stage is within the GPU's "
    "memory less the margin",
    "FLOPs are the MFU count of training/flops.py (matmuls, causal pairs per document, "
    "active experts, ViT and connector included, 3x forward); recomputation adds hardware "
    "FLOPs to the step time, not to MFU",
    "compute runs at efficiency x dense BF16 peak; TP moves two all-reduces' worth of "
    "[s, b, h] per layer forward and two backward (a third pass with full recompute), not "
    "overlapped; MoE all-to-alls move top_k copies of each token four times per layer",
    "NVLink inside a node of 8 GPUs, one InfiniBand NIC per GPU between nodes; ranks are "
    "ordered TP, CP, DP, PP (Megatron-Core), so a group spanning more than 8 consecutive "
    "ranks crosses nodes",
    "context parallelism (CP > 1) is estimated on the local attention path, the only one it "
    "runs on (model.transformer_impl=auto is estimated as local, which such a run must set, "
    "without FP8; the ViT keeps its attention probabilities there): each rank runs "
    "seq_length / CP tokens of every sequence and 1/CP of its causal pairs; every decoder "
    "layer keeps the gathered whole-sequence K and V and, per run of local queries padded "
    "with placeholder queries, its padded queries, output and log-sum-exp (the busiest "
    "rank's, one document per sequence), not with selective or full "
    "recomputation; the busiest rank encodes min(N, N / CP + 2) of a sequence's N images; "
    "per layer the K/V all-gather (again when recomputed) and the all-reduce of their "
    "gradients run over the TP x CP ranks, not overlapped; the distributed optimizer shards "
    "over DP x CP, micro-batches are counted over DP",
    "pipeline time is (m - 1) x slowest stage + sum of stages (fill, drain, imbalance); "
    "the vision-stage recommendation simulates the 1F1B schedule instead, each micro-batch's "
    "vision stage at its own images; DP reduce-scatter and all-gather overlap with one "
    "backward and one forward of a micro-batch; the optimizer step streams 28 B per "
    "parameter of its shard through HBM",
)


def parameter_summary(cfg: MM1Config) -> Dict[str, int]:
    counts = count_parameters(cfg.model)
    return {
        "total": counts.total,
        "active": counts.vision_encoder + counts.connector + counts.llm_active,
        "vision_encoder": counts.vision_encoder,
        "connector": counts.connector,
        "language_model": counts.language_model,
        "llm_embedding": counts.llm_embedding,
        "llm_active_non_embedding": counts.llm_active_non_embedding,
    }


@dataclass
class Estimate:
    layout: Layout
    num_gpus: int
    gpu: GpuType
    workload: Workload
    global_batch_size: int
    memory: MemoryEstimate
    step: StepTime
    flops: FlopsBreakdown  # per sequence
    memory_margin: float

    @property
    def usable_bytes(self) -> float:
        return self.gpu.memory_bytes * (1 - self.memory_margin)

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.usable_bytes

    @property
    def flops_per_step(self) -> float:
        return self.flops.total * self.global_batch_size

    @property
    def mfu(self) -> float:
        return self.flops_per_step / (self.step.step * self.num_gpus * self.gpu.peak_bf16_flops)

    @property
    def tokens_per_second_per_gpu(self) -> float:
        return self.global_batch_size * self.workload.seq_length / self.step.step / self.num_gpus

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.to_dict(),
            "peak_memory_bytes": self.memory.peak,
            "usable_memory_bytes": self.usable_bytes,
            "fits": self.fits,
            "step": self.step.to_dict(),
            "mfu": self.mfu,
            "tokens_per_second_per_gpu": self.tokens_per_second_per_gpu,
            "memory_stages": [s.to_dict() for s in self.memory.stages],
        }


def layout_of(cfg: MM1Config, num_gpus: int) -> Layout:
    par = cfg.parallel
    tp, cp, pp = par.tensor_parallel_size, par.context_parallel_size, par.pipeline_parallel_size
    return Layout(
        tp=tp,
        pp=pp,
        dp=num_gpus // (tp * cp * pp),
        ep=par.expert_parallel_size,
        recompute=par.recompute,
        vision_stage_layers=par.num_decoder_layers_on_vision_stage,
        last_stage_layers=par.num_decoder_layers_on_last_stage,
        cp=cp,
    )


def estimate_config(
    cfg: MM1Config,
    *,
    num_gpus: int,
    gpu: GpuType,
    workload: Workload,
    memory_workload: Optional[Workload] = None,
    efficiency: float = DEFAULT_EFFICIENCY,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
) -> Estimate:
    """The estimate for ``cfg``'s own parallel settings on ``num_gpus`` GPUs: FLOPs and
    step time for ``workload``, memory for ``memory_workload`` (the worst micro-batch;
    ``workload`` when not given)."""
    memory = estimate_memory(cfg, memory_workload or workload, num_gpus=num_gpus)
    step = estimate_step_time(
        cfg, workload, memory, num_gpus=num_gpus, gpu=gpu, efficiency=efficiency
    )
    return Estimate(
        layout=layout_of(cfg, num_gpus),
        num_gpus=num_gpus,
        gpu=gpu,
        workload=workload,
        global_batch_size=cfg.training.global_batch_size,
        memory=memory,
        step=step,
        flops=flops_per_sequence(cfg.model, workload),
        memory_margin=memory_margin,
    )


def config_layout_error(cfg: MM1Config, num_gpus: int) -> Optional[str]:
    par = cfg.parallel
    if num_gpus % (
        par.tensor_parallel_size * par.context_parallel_size * par.pipeline_parallel_size
    ):
        return f"{num_gpus} GPUs do not divide into TP x CP x PP of the config"
    return layout_error(cfg, layout_of(cfg, num_gpus), num_gpus)


@dataclass
class Ranking:
    fitting: List[Estimate]  # fastest first
    over_memory: List[Estimate] = field(default_factory=list)  # each layout's best split
    num_layouts: int = 0  # valid (TP, PP, DP, EP, recompute) combinations


def _split_order(cfg: MM1Config, layouts: List[Layout], w: Workload, gpu, efficiency) -> list:
    """The layouts (pipeline splits) by their pipeline time, fastest first: per-layer
    stage times are computed once and added up per split."""
    if len(layouts) == 1:
        return layouts
    shape_cfg = apply_layout(cfg, layouts[0])
    dp, m = layouts[0].dp, num_microbatches(shape_cfg, layouts[0].dp)

    def seconds(stage: Stage) -> float:
        t = stage_time(shape_cfg, w, stage, gpu=gpu, efficiency=efficiency, dp=dp)
        return t.total - t.pipeline_send

    per_layer = [seconds(Stage(0, (i,), False, False, 1)) for i in range(cfg.model.llm.num_layers)]
    vision = seconds(Stage(0, (), True, False, 1))
    output = seconds(Stage(0, (), False, True, 1))
    prefix = [0.0]
    for value in per_layer:
        prefix.append(prefix[-1] + value)

    def pipeline(layout: Layout) -> float:
        pp, first, last = layout.pp, layout.vision_stage_layers, layout.last_stage_layers
        middle = (len(per_layer) - first - last) // (pp - 2) if pp > 2 else 0
        bounds = [0, first] + [first + middle * (i + 1) for i in range(pp - 2)]
        bounds.append(len(per_layer))
        totals = [prefix[b] - prefix[a] for a, b in zip(bounds, bounds[1:])]
        totals[0] += vision
        totals[-1] += output
        return pipeline_seconds(totals, m)

    return sorted(layouts, key=pipeline)


def rank_layouts(
    cfg: MM1Config,
    *,
    num_gpus: int,
    gpu: GpuType,
    workload: Workload,
    memory_workload: Optional[Workload] = None,
    efficiency: float = DEFAULT_EFFICIENCY,
    memory_margin: float = DEFAULT_MEMORY_MARGIN,
) -> Ranking:
    """Every valid layout for ``num_gpus`` GPUs, with its fastest pipeline split that fits
    (the ``SPLITS_TRIED`` fastest splits are estimated in full), ranked by step time."""
    ranking = Ranking(fitting=[])
    for layouts in valid_layouts(cfg, num_gpus):
        ranking.num_layouts += 1
        best_over: Optional[Estimate] = None
        for layout in _split_order(cfg, layouts, workload, gpu, efficiency)[:SPLITS_TRIED]:
            estimate = estimate_config(
                apply_layout(cfg, layout),
                num_gpus=num_gpus,
                gpu=gpu,
                workload=workload,
                memory_workload=memory_workload,
                efficiency=efficiency,
                memory_margin=memory_margin,
            )
            if estimate.fits:
                ranking.fitting.append(estimate)
                break
            if best_over is None or estimate.memory.peak < best_over.memory.peak:
                best_over = estimate
        else:
            if best_over is not None:
                ranking.over_memory.append(best_over)
    ranking.fitting.sort(key=lambda e: e.step.step)
    ranking.over_memory.sort(key=lambda e: e.memory.peak)
    return ranking


def gib(num_bytes: float) -> float:
    return num_bytes / 2**30


def default_num_gpus(cfg: MM1Config) -> int:
    """The smallest GPU count the config's layout runs on (DP just large enough for EP:
    EP x expert TP must divide DP x CP x TP)."""
    par = cfg.parallel
    tp, ep, cp = par.tensor_parallel_size, par.expert_parallel_size, par.context_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    need = ep * etp
    dp = need // math.gcd(need, tp * cp)
    return tp * cp * par.pipeline_parallel_size * dp
