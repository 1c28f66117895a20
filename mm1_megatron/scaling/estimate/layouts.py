"""Parallel layouts for a GPU count: which are valid, as the config validation and the
launcher define validity.

A layout is TP x CP x PP x DP (= the GPU count), EP inside DP x CP x TP, context
parallelism CP in {1, 2, 4, 8} (the config check refuses it with
``model.transformer_impl=transformer_engine``; with ``auto`` the estimate takes the local
attention path for CP > 1, the only one CP runs on: ``activations.kernels_for``),
sequence parallelism with
TP > 1 (never worse: the same bytes move, and activations outside attention and MLP are
split), a recomputation policy, and for PP > 1 the decoder layers of the vision stage and
of the last stage. A candidate is valid when ``validate_config`` accepts it (heads and
query groups divisible by TP, experts by EP, MoE with TP needs SP, the pipeline split,
``training.seq_length`` a multiple of what CP and SP need),
``check_world_size`` accepts the GPU count (EP x expert-TP inside DP x TP), and the global
batch splits into whole micro-batches over DP.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Tuple

from mm1_megatron.config.layout import check_world_size
from mm1_megatron.config.schema import RECOMPUTE_MODES, MM1Config
from mm1_megatron.config.validation import validate_config

CONTEXT_PARALLEL_SIZES = (1, 2, 4, 8)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int = 1
    recompute: str = "none"
    vision_stage_layers: Optional[int] = None  # decoder layers on stage 0 (PP > 1)
    last_stage_layers: Optional[int] = None
    cp: int = 1  # context parallelism (DP is what is left of TP x CP x PP)

    @property
    def sp(self) -> bool:
        return self.tp > 1

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        return (self.tp, self.pp, self.dp, self.ep, self.cp)

    def to_dict(self) -> dict:
        return {**asdict(self), "sp": self.sp}

    def describe(self) -> str:
        split = ""
        if self.pp > 1:
            split = f" split {self.vision_stage_layers}/../{self.last_stage_layers}"
        ep = f" EP{self.ep}" if self.ep > 1 else ""
        cp = f" CP{self.cp}" if self.cp > 1 else ""
        return f"TP{self.tp}{cp} PP{self.pp} DP{self.dp}{ep} {self.recompute}{split}"


def apply_layout(cfg: MM1Config, layout: Layout) -> MM1Config:
    """A copy of ``cfg`` with ``layout``'s parallel settings."""
    out = copy.deepcopy(cfg)
    par = out.parallel
    par.tensor_parallel_size = layout.tp
    par.context_parallel_size = layout.cp
    par.pipeline_parallel_size = layout.pp
    par.expert_parallel_size = layout.ep
    par.sequence_parallel = layout.sp
    par.recompute = layout.recompute
    par.num_decoder_layers_on_vision_stage = layout.vision_stage_layers
    par.num_decoder_layers_on_last_stage = layout.last_stage_layers
    if layout.pp == 1:
        par.num_decoder_layers_on_vision_stage = par.num_decoder_layers_on_last_stage = None
    return out


def layout_error(cfg: MM1Config, layout: Layout, num_gpus: int) -> Optional[str]:
    """Why ``layout`` cannot run ``cfg`` on ``num_gpus`` GPUs, or None when it can."""
    world = layout.tp * layout.cp * layout.pp * layout.dp
    if world != num_gpus:
        return f"TP x CP x PP x DP = {world} is not {num_gpus}"
    candidate = apply_layout(cfg, layout)
    try:
        validate_config(candidate)
        check_world_size(candidate.parallel, num_gpus)
    except ValueError as exc:
        return str(exc)
    t = candidate.training
    if t.global_batch_size % (t.micro_batch_size * layout.dp):
        return (
            f"training.global_batch_size={t.global_batch_size} is not a multiple of "
            f"micro_batch_size x DP = {t.micro_batch_size} x {layout.dp}"
        )
    return None


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pipeline_splits(num_layers: int, pp: int) -> Iterator[Tuple[Optional[int], Optional[int]]]:
    """(vision stage, last stage) decoder-layer counts that leave the middle stages an even
    share: every pair for PP > 2, ``(k, L - k)`` for PP = 2, nothing pinned for PP = 1."""
    if pp == 1:
        yield None, None
        return
    for first in range(1, num_layers):
        for last in range(1, num_layers - first + 1):
            rest = num_layers - first - last
            if (pp == 2 and rest == 0) or (pp > 2 and rest >= pp - 2 and rest % (pp - 2) == 0):
                yield first, last


def layout_shapes(cfg: MM1Config, num_gpus: int) -> Iterator[Tuple[int, int, int, int, int]]:
    """(TP, CP, PP, DP, EP) combinations to try: divisors of the GPU count, CP one of
    ``CONTEXT_PARALLEL_SIZES``, EP dividing the expert count (1 for a dense model)."""
    num_experts = cfg.model.llm.moe.num_experts
    for tp in divisors(num_gpus):
        for cp in (c for c in CONTEXT_PARALLEL_SIZES if (num_gpus // tp) % c == 0):
            for pp in divisors(num_gpus // (tp * cp)):
                dp = num_gpus // (tp * cp * pp)
                for ep in divisors(num_experts) if num_experts else [1]:
                    yield tp, cp, pp, dp, ep


def valid_layouts(
    cfg: MM1Config, num_gpus: int, recompute_modes=RECOMPUTE_MODES
) -> Iterator[List[Layout]]:
    """For each valid (TP, CP, PP, DP, EP) and recomputation policy: its layouts, one per
    pipeline split (one layout for PP = 1). The shape is checked once; every split
    ``pipeline_splits`` yields passes the validation's pipeline rule by construction
    (``tests/scaling/test_layouts.py`` checks both against a brute-force search)."""
    num_layers = cfg.model.llm.num_layers
    for tp, cp, pp, dp, ep in layout_shapes(cfg, num_gpus):
        splits = list(pipeline_splits(num_layers, pp))
        first = Layout(tp, pp, dp, ep, "none", *splits[0], cp=cp) if splits else None
        if first is None or layout_error(cfg, first, num_gpus):
            continue
        for recompute in recompute_modes:
            yield [Layout(tp, pp, dp, ep, recompute, a, b, cp=cp) for a, b in splits]
