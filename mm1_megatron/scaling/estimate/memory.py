"""Memory per GPU, by pipeline stage and component: weights, gradients, optimizer state,
the activations of the micro-batches a stage holds at once, and the transients at the
peak (the first backward steps of the last micro-batch).

Bytes per parameter follow Megatron-Core's mixed precision: bf16 weights (2 B), fp32
gradient buffers (4 B, ``grad_reduce_in_fp32``), and fp32 master weights plus Adam's two
moments (12 B), divided over the data-parallel group with the distributed optimizer (DP x
CP: Megatron-Core's group with context parallelism; expert parameters over the
expert-data-parallel group). An fp32 run (CPU) keeps 4 B
weights, 4 B gradients and 8 B of Adam state (no master copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.scaling.estimate.activations import Kernels, kernels_for
from mm1_megatron.scaling.estimate.context_parallel import CountedShare, rank_workload
from mm1_megatron.scaling.estimate.model_activations import micro_batch_terms, peak_moments
from mm1_megatron.scaling.estimate.stages import RankParameters, pipeline_stages, rank_parameters
from mm1_megatron.scaling.estimate.workload import Workload, pixel_values_per_image

GRADIENT_BYTES = 4
HOST_BATCH_BYTES_PER_TOKEN = 5 * 8  # tokens, labels, positions, documents, sources (int64)


@dataclass(frozen=True)
class RunPrecision:
    """How a run on ``device`` stores its numbers (``training.precision``,
    ``training.fused_kernels``)."""

    device: str  # "gpu" or "cpu"
    bf16: bool
    fused: bool

    @classmethod
    def of(cls, cfg: MM1Config, device: str) -> RunPrecision:
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device={device!r} must be 'gpu' or 'cpu'")
        gpu = device == "gpu"
        bf16 = gpu and cfg.training.precision in ("auto", "bf16")
        fused = gpu if cfg.training.fused_kernels is None else cfg.training.fused_kernels
        return cls(device=device, bf16=bf16, fused=fused)

    @property
    def weight_bytes(self) -> int:
        return 2 if self.bf16 else 4

    @property
    def optimizer_bytes(self) -> int:
        return 12 if self.bf16 else 8


@dataclass
class StageMemory:
    stage: int
    num_decoder_layers: int
    in_flight: int
    parameters: RankParameters
    weights: float
    gradients: float
    optimizer_states: float
    activations: Dict[str, float]  # by component, all in-flight micro-batches
    transients: Dict[str, float]  # alive beside them at the peak (negative: already freed)
    peak_moment: str = ""
    activation_terms: Dict[str, Dict[str, float]] = field(default_factory=dict)  # one mb

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer_states

    @property
    def activations_peak(self) -> float:
        return sum(self.activations.values()) + sum(self.transients.values())

    @property
    def total(self) -> float:
        return self.static + self.activations_peak

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "num_decoder_layers": self.num_decoder_layers,
            "in_flight_micro_batches": self.in_flight,
            "parameters": self.parameters.total,
            "weights": self.weights,
            "gradients": self.gradients,
            "optimizer_states": self.optimizer_states,
            "activations": dict(self.activations),
            "transients": dict(self.transients),
            "peak_moment": self.peak_moment,
            "activations_peak": self.activations_peak,
            "total": self.total,
            "activation_terms_per_micro_batch": self.activation_terms,
        }


@dataclass
class MemoryEstimate:
    stages: List[StageMemory]
    kernels: Kernels
    precision: RunPrecision

    @property
    def peak_stage(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak(self) -> float:
        return self.peak_stage.total


def _trainable(params: RankParameters, frozen) -> Dict[str, float]:
    """Dense and expert parameters that get gradients (``model.freeze`` excluded)."""
    dense = sum(
        getattr(params, name)
        for name in ("vision_encoder", "connector", "language_model")
        if name not in frozen
    )
    experts = 0.0 if "language_model" in frozen else params.experts
    return {"dense": dense, "experts": experts}


def data_parallel_sizes(cfg: MM1Config, num_gpus: int) -> Dict[str, int]:
    """Group sizes over ``num_gpus = TP x CP x PP x DP`` ranks: ``batches`` (DP: the
    micro-batches per step are counted over it; the CP ranks of a group read the same
    ones), ``dense`` (DP x CP: Megatron-Core's data-parallel group with context
    parallelism, over which DDP reduces gradients and the distributed optimizer shards
    its state) and ``experts`` (the expert-data-parallel group, ``world / (ETP x EP x
    PP)`` in ``parallel_state``: DP x CP x TP / (EP x ETP))."""
    par = cfg.parallel
    tp, pp, ep = par.tensor_parallel_size, par.pipeline_parallel_size, par.expert_parallel_size
    cp = par.context_parallel_size
    etp = par.expert_tensor_parallel_size or tp
    dp = num_gpus // (tp * cp * pp)
    return {"batches": dp, "dense": dp * cp, "experts": max(1, dp * cp * tp // (ep * etp))}


def estimate_memory(
    cfg: MM1Config,
    workload: Workload,
    *,
    num_gpus: int,
    device: str = "gpu",
    counted: Optional[CountedShare] = None,
) -> MemoryEstimate:
    """Per-stage memory of one rank for ``cfg`` on ``num_gpus`` GPUs (or CPU processes).
    With context parallelism the activations are one rank's share of ``workload``
    (``context_parallel.rank_workload``: the busiest rank's, or what a measured rank
    ``counted``) while the host holds whole micro-batches."""
    precision = RunPrecision.of(cfg, device)
    kernels = kernels_for(
        cfg.model,
        device=device,
        bf16=precision.bf16,
        fused=precision.fused,
        context_parallel=cfg.parallel.context_parallel_size,
    )
    dp = data_parallel_sizes(cfg, num_gpus)
    micro = cfg.training.micro_batch_size
    num_microbatches = max(1, cfg.training.global_batch_size // (micro * dp["batches"]))
    shards = dp if cfg.parallel.use_distributed_optimizer else {"dense": 1, "experts": 1}
    share = rank_workload(cfg, workload, counted)
    stages = []
    for stage in pipeline_stages(cfg, num_microbatches):
        params = rank_parameters(cfg.model, cfg.parallel, stage)
        trainable = _trainable(params, set(cfg.model.freeze))
        terms = micro_batch_terms(cfg, share, kernels, stage, counted)
        activations = {name: sum(t.values()) * stage.in_flight for name, t in terms.items()}
        moments = peak_moments(
            cfg, share, kernels, stage, precision.weight_bytes, params.largest_tensor
        )
        moment = max(moments, key=lambda name: sum(moments[name].values()))
        transients = dict(moments[moment])
        if device == "cpu":  # the step's host batches live in the same memory
            pixels = (
                workload.images_per_sequence * micro * pixel_values_per_image(cfg.model, workload)
            ) * workload.pixel_bytes
            tokens = workload.seq_length * micro * HOST_BATCH_BYTES_PER_TOKEN
            # The ViT's input is the host batch's pixels, except under CP (its own selection).
            own_input = stage.has_vision and cfg.parallel.context_parallel_size == 1
            counted = stage.in_flight if own_input else 0
            transients["host_batches"] = (num_microbatches - counted) * pixels + (
                num_microbatches * tokens
            )
        stages.append(
            StageMemory(
                stage=stage.index,
                num_decoder_layers=len(stage.decoder_layers),
                in_flight=stage.in_flight,
                parameters=params,
                weights=params.total * precision.weight_bytes,
                gradients=(trainable["dense"] + trainable["experts"]) * GRADIENT_BYTES,
                optimizer_states=precision.optimizer_bytes
                * sum(trainable[kind] / shards[kind] for kind in trainable),
                activations=activations,
                transients=transients,
                peak_moment=moment,
                activation_terms=terms,
            )
        )
    return MemoryEstimate(stages=stages, kernels=kernels, precision=precision)
