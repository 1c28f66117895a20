"""Config checks of context parallelism (``parallel.context_parallel_size``). Run by
``validate_config`` (``validation.py``); what each refusal is for: docs/parallelism.md."""

from __future__ import annotations

import math

from mm1_megatron.config.check_errors import Errors as _Errors
from mm1_megatron.config.model_checks import FP8_TOKEN_MULTIPLE
from mm1_megatron.config.schema import MM1Config


def context_parallel_token_multiple(cfg: MM1Config) -> int:
    """What ``training.seq_length`` must be a multiple of: 2 x CP chunks per sequence, and
    each rank's share split again over TP by sequence parallelism."""
    par = cfg.parallel
    cp, tp = par.context_parallel_size, par.tensor_parallel_size
    split = tp if par.sequence_parallel else 1
    return math.lcm(2 * cp, cp * split)


def thd_token_multiple(cfg: MM1Config) -> int:
    """What the per-document split's padded row must be a multiple of: 2 x CP chunks per
    document, each rank's share split over TP by sequence parallelism, and with FP8 each
    rank's tokens (per TP rank with SP) a multiple of 16 for its GEMMs."""
    multiple = context_parallel_token_multiple(cfg)
    if cfg.model.fp8 is None:
        return multiple
    par = cfg.parallel
    split = par.tensor_parallel_size if par.sequence_parallel else 1
    return math.lcm(multiple, FP8_TOKEN_MULTIPLE * par.context_parallel_size * split)


def thd_context_parallel(cfg: MM1Config) -> bool:
    """Does this run split its sequences per document for Transformer Engine's THD
    context parallelism (``batch.document_split``)? The local path splits whole rows."""
    return (
        cfg.parallel.context_parallel_size > 1
        and cfg.model.transformer_impl == "transformer_engine"
    )


def check_context_parallel(cfg: MM1Config, err: _Errors) -> None:
    cp, p = cfg.parallel.context_parallel_size, "parallel.context_parallel_size"
    err.check(cp >= 1, f"{p}={cp} must be >= 1 (1: no context parallelism)")
    if cp <= 1 or min(cfg.parallel.tensor_parallel_size, cfg.training.seq_length) < 1:
        return
    multiple = context_parallel_token_multiple(cfg)
    seq_length = cfg.training.seq_length
    err.check(
        seq_length % multiple == 0,
        f"training.seq_length={seq_length} is not a multiple of {multiple}, which {p}={cp} "
        f"needs (2 x CP chunks per sequence, each rank's share split over TP with sequence "
        f"parallelism); use seq_length={max(multiple, seq_length // multiple * multiple)}",
    )
    err.check(
        not thd_context_parallel(cfg)
        or cfg.parallel.pipeline_parallel_size == 1
        or cfg.model.llm.moe.num_experts == 0
        or cfg.model.llm.moe.token_dispatcher == "alltoall",
        f"{p}={cp} with model.transformer_impl=transformer_engine and pipeline parallelism "
        f"sends activations whose length varies, which Megatron-Core's "
        f"{cfg.model.llm.moe.token_dispatcher} token dispatcher refuses: set "
        f"model.llm.moe.token_dispatcher=alltoall",
    )
    err.check(
        cfg.model.attention == "per_document",
        f"{p}={cp} needs model.attention=per_document (the dense-mask reference has no "
        "context-parallel form)",
    )
    err.check(
        cfg.training.objective == "language_modeling",
        f"training.objective={cfg.training.objective} with {p}={cp}: the preference loss "
        f"needs each sequence's whole log-probability on one rank; train it with {p}=1",
    )
    err.check(
        cfg.eval.interval == 0 or not cfg.eval.tasks,
        f"eval.tasks={cfg.eval.tasks} generate text, which {p}={cp} cannot split; set "
        "eval.tasks=[] (the held-out loss still runs) and score checkpoints with mm1 eval "
        "(context_parallel_size=1; checkpoints load at any CP)",
    )
