"""A step-time model: compute at a stated efficiency, communication at stated bandwidths,
and the 1F1B pipeline with uneven stages.

Per stage and micro-batch: forward + backward compute (3x the forward FLOPs, +1x the
recomputed layers with full recomputation, +1x core attention with selective), divided by
TP except the connector, at ``efficiency x peak``; TP collectives (two all-reduces'
worth per transformer layer forward and two backward, of the ``[s, b, h]`` activations;
AG + RS with SP move the same bytes); MoE all-to-alls (dispatch and combine, forward and
backward); the pipeline sends; and with context parallelism (each rank computing its
``1/CP`` share of every sequence) each decoder layer's K/V all-gather and the all-reduce
of their gradients over the CP group (``context_parallel.py``). The pipeline takes
``(m - 1) x slowest + sum of all stages``: a stage that is slower than the others (the
vision stage with many images, or the last with the output layer) stretches every
micro-batch, and filling and draining the pipeline costs one pass through every stage.
Data-parallel gradient reduce-scatter and parameter all-gather overlap with the last
backward and the first forward when the run overlaps them (``parallel.overlap_*``, on by
default on GPUs), and the optimizer step streams its state through HBM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.models.param_count import moe_layer_flags
from mm1_megatron.scaling.estimate.compute import StageFlops, stage_forward_flops
from mm1_megatron.scaling.estimate.context_parallel import context_parallel_seconds, rank_workload
from mm1_megatron.scaling.estimate.hardware import GpuType, link_bandwidth
from mm1_megatron.scaling.estimate.memory import MemoryEstimate, data_parallel_sizes
from mm1_megatron.scaling.estimate.stages import Stage, pipeline_stages
from mm1_megatron.scaling.estimate.workload import Workload, vision_tokens_per_image

ACTIVATION_BYTES = 2  # bf16 activations and gradients on the wire
GRADIENT_BYTES = 4  # gradients are reduced in fp32
# Bytes the optimizer step reads and writes per parameter of its shard: fp32 gradient,
# master weight and two moments read and written, the bf16 weight written.
OPTIMIZER_STEP_BYTES = 4 + 2 * (4 + 4 + 4) + 2


@dataclass(frozen=True)
class StageTime:
    """Seconds per micro-batch on one stage."""

    forward: float
    backward: float
    tensor_parallel: float
    expert_parallel: float
    pipeline_send: float
    context_parallel: float = 0.0  # K/V all-gathers and gradient all-reduces

    @property
    def total(self) -> float:
        return (
            self.forward
            + self.backward
            + self.tensor_parallel
            + self.expert_parallel
            + self.pipeline_send
            + self.context_parallel
        )


@dataclass(frozen=True)
class StepTime:
    stages: List[StageTime]
    num_microbatches: int
    pipeline: float
    data_parallel_exposed: float
    optimizer: float

    @property
    def step(self) -> float:
        return self.pipeline + self.data_parallel_exposed + self.optimizer

    @property
    def bubble_fraction(self) -> float:
        """Idle share of the average stage: fill, drain and waiting on the slowest."""
        busy = self.num_microbatches * sum(s.total for s in self.stages) / len(self.stages)
        return 1.0 - busy / self.pipeline

    def to_dict(self) -> Dict[str, object]:
        return {
            "step_seconds": self.step,
            "pipeline_seconds": self.pipeline,
            "bubble_fraction": self.bubble_fraction,
            "data_parallel_exposed_seconds": self.data_parallel_exposed,
            "optimizer_seconds": self.optimizer,
            "stage_seconds_per_micro_batch": [{**asdict(s), "total": s.total} for s in self.stages],
        }


def _all_reduce(num_bytes: float, group: int, bandwidth: float) -> float:
    return 2 * (group - 1) / group * num_bytes / bandwidth if group > 1 else 0.0


def _compute_seconds(f: StageFlops, cfg: MM1Config, gpu: GpuType, efficiency: float):
    tp, recompute = cfg.parallel.tensor_parallel_size, cfg.parallel.recompute
    rate = gpu.peak_bf16_flops * efficiency
    forward = (f.split / tp + f.replicated) / rate
    backward = 2 * forward
    if recompute == "full":
        backward += f.transformer_layers / tp / rate
    elif recompute == "selective":
        backward += f.attention / tp / rate
    return forward, backward


def _stage_comm(cfg: MM1Config, w: Workload, stage, gpu: GpuType, dp: int):
    """TP, EP and pipeline seconds of one micro-batch; ``w`` is one CP rank's share."""
    par, model = cfg.parallel, cfg.model
    tp, micro = par.tensor_parallel_size, cfg.training.micro_batch_size
    passes = 3 if par.recompute == "full" else 2  # forward, backward (+ recomputed forward)
    tp_bw = link_bandwidth(gpu, tp)
    decoder_bytes = ACTIVATION_BYTES * w.seq_length * micro * model.llm.hidden_size
    layers = len(stage.decoder_layers)
    tp_seconds = passes * 2 * layers * _all_reduce(decoder_bytes, tp, tp_bw)
    if stage.has_vision and w.images_per_sequence:
        v = model.vision
        tokens = vision_tokens_per_image(model, w)
        vit_bytes = ACTIVATION_BYTES * tokens * w.images_per_sequence * micro * v.hidden_size
        tp_seconds += passes * 2 * v.num_layers * _all_reduce(vit_bytes, tp, tp_bw)
    ep_seconds = 0.0
    ep = par.expert_parallel_size
    if ep > 1:
        etp = par.expert_tensor_parallel_size or tp
        flags = moe_layer_flags(model.llm)
        moe_layers = sum(flags[i] for i in stage.decoder_layers)
        local = w.seq_length * micro / (tp if par.sequence_parallel else 1)
        sent = ACTIVATION_BYTES * local * model.llm.moe.top_k * model.llm.hidden_size
        ep_bw = link_bandwidth(gpu, ep * etp)
        ep_seconds = moe_layers * 4 * sent * (ep - 1) / ep / ep_bw
    send = 0.0
    if par.pipeline_parallel_size > 1:
        shard = tp if par.sequence_parallel else 1
        send_bytes = decoder_bytes / shard
        span = 2 * tp * par.context_parallel_size * dp  # ranks are ordered TP, CP, DP, PP
        send = 2 * send_bytes / link_bandwidth(gpu, span)  # activations + gradients
    return tp_seconds, ep_seconds, send


def stage_time(
    cfg: MM1Config, w: Workload, stage: Stage, *, gpu: GpuType, efficiency: float, dp: int
) -> StageTime:
    """Seconds one micro-batch spends on ``stage`` (compute and the communication in its
    critical path) on one rank: under context parallelism its share of ``w``
    (``context_parallel.rank_workload``) and the K/V collectives over the CP group;
    ``dp`` is the data-parallel size without CP."""
    share = rank_workload(cfg, w)
    f = stage_forward_flops(cfg.model, share, stage, cfg.training.micro_batch_size)
    forward, backward = _compute_seconds(f, cfg, gpu, efficiency)
    tp_s, ep_s, send = _stage_comm(cfg, share, stage, gpu, dp)
    par = cfg.parallel
    cp_bandwidth = link_bandwidth(gpu, par.tensor_parallel_size * par.context_parallel_size)
    cp_s = context_parallel_seconds(
        cfg, share.seq_length, len(stage.decoder_layers), ACTIVATION_BYTES, cp_bandwidth
    )
    return StageTime(forward, backward, tp_s, ep_s, send, cp_s)


def pipeline_seconds(stage_totals: List[float], num_microbatches: int) -> float:
    """1F1B with uneven stages: fill and drain pass every stage once, and the other
    ``m - 1`` micro-batches go at the pace of the slowest."""
    return (num_microbatches - 1) * max(stage_totals) + sum(stage_totals)


def num_microbatches(cfg: MM1Config, dp: int) -> int:
    return max(1, cfg.training.global_batch_size // (cfg.training.micro_batch_size * dp))


def estimate_step_time(
    cfg: MM1Config,
    w: Workload,
    memory: MemoryEstimate,
    *,
    num_gpus: int,
    gpu: GpuType,
    efficiency: float,
) -> StepTime:
    """Seconds per optimizer step of ``cfg`` (its layout) on ``num_gpus`` GPUs."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"--efficiency={efficiency} must be in (0, 1]")
    par = cfg.parallel
    sizes = data_parallel_sizes(cfg, num_gpus)
    m = num_microbatches(cfg, sizes["batches"])
    times, exposed = [], []
    overlap_grad = par.overlap_grad_reduce is not False
    overlap_param = par.overlap_param_gather is not False and par.use_distributed_optimizer
    for stage, mem in zip(pipeline_stages(cfg, m), memory.stages):
        t = stage_time(cfg, w, stage, gpu=gpu, efficiency=efficiency, dp=sizes["batches"])
        times.append(t)
        dp_seconds = _data_parallel_seconds(cfg, mem, gpu, sizes)
        hidden = (t.backward if overlap_grad else 0.0) + (t.forward if overlap_param else 0.0)
        exposed.append(max(0.0, dp_seconds - hidden))
    pipeline = pipeline_seconds([t.total for t in times], m)
    optimizer = max(
        OPTIMIZER_STEP_BYTES * mem.optimizer_states / memory.precision.optimizer_bytes
        for mem in memory.stages
    )
    return StepTime(times, m, pipeline, max(exposed), optimizer / gpu.hbm_bytes_per_s)


def _data_parallel_seconds(cfg: MM1Config, mem, gpu: GpuType, sizes: Dict[str, int]) -> float:
    """Gradient reduce-scatter (fp32) + bf16 parameter all-gather with the distributed
    optimizer, an fp32 all-reduce without; dense parameters over DP x CP, experts over the
    expert-data-parallel group."""
    tp = cfg.parallel.tensor_parallel_size
    seconds = 0.0
    params = mem.parameters
    dense = params.total - params.experts
    for count, group in ((dense, sizes["dense"]), (params.experts, sizes["experts"])):
        if group <= 1 or count == 0:
            continue
        bandwidth = link_bandwidth(gpu, tp * group)
        if cfg.parallel.use_distributed_optimizer:
            moved = (GRADIENT_BYTES + ACTIVATION_BYTES) * count * (group - 1) / group
            seconds += moved / bandwidth
        else:
            seconds += _all_reduce(GRADIENT_BYTES * count, group, bandwidth)
    return seconds
