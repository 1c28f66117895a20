"""The model an evaluation runs: a training checkpoint's weights at any layout.

The config is read as ``mm1 train`` reads one, with the checkpoint's own resolved
``config.yaml`` as the first file: then any ``--config`` files, left to right, then the
dotted overrides. The checkpoint's file describes the model (and holds the run's ``eval``
section); the others choose the evaluation (``eval.*``) and the layout
(``parallel.tensor_parallel_size=2`` ...). Sequence parallelism is turned off (a
generated token cannot be split across TP ranks), and weights are drawn nowhere special
since the checkpoint replaces them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from megatron.core import parallel_state

from mm1_megatron.checkpoint import layout, load_model_weights, resolve_checkpoint
from mm1_megatron.checkpoint.adapters import load_adapted_model
from mm1_megatron.config import MM1Config, load_config, validate_config
from mm1_megatron.config.machine import resolve_machine_settings, transformer_engine_version
from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.data.tokenizers.text import build_tokenizer
from mm1_megatron.models import RuntimeOptions, build_mm1_model
from mm1_megatron.models.lora import merge_adapters
from mm1_megatron.parallel import init_distributed, seed_everything
from mm1_megatron.parallel.distributed import DistributedContext

logger = logging.getLogger(__name__)

# FP8 off: TE's FP8 GEMMs need token counts in multiples of 16, which prompt prefill and
# one-token decode steps are not (megatron-core's inference wrapper pads them; ours does
# not). The weights are the same; FP8 only changes how the matrix products are computed.
EVAL_OVERRIDES = (
    "parallel.sequence_parallel=false",
    "model.attention=per_document",
    "model.fp8=null",
    "model.fp8_on_gpu=null",
)


@dataclass
class EvalModel:
    cfg: MM1Config
    model: torch.nn.Module  # this rank's pipeline stage, in eval mode
    tokenizer: Tokenizer
    ctx: DistributedContext
    checkpoint: Path
    step: int


PathLike = Union[str, Path]

# Model fields an evaluation may choose: how the layers compute (or train), not what they are.
EVAL_CHOOSES = {
    f"model.{name}"
    for name in (
        "transformer_impl",
        "attention",
        "fp8",
        "fp8_on_gpu",
        "fp8_recipe",
        "init_method_std",
        "freeze",
        "llm.moe.grouped_gemm",
        "llm.moe.token_dispatcher",
        "llm.moe.aux_loss_coeff",
        "llm.moe.z_loss_coeff",
    )
}


def checkpoint_config(
    checkpoint: Path, overrides: Sequence[str] = (), configs: Sequence[PathLike] = ()
) -> MM1Config:
    """The validated config of an evaluation of ``checkpoint``: its ``config.yaml``, then
    ``configs`` (merged left to right, as ``mm1 train --config``), then ``overrides``."""
    folder = resolve_checkpoint(checkpoint)
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.yaml: not a checkpoint written by mm1 train")
    files = [config_file, *configs]
    cfg = validate_config(load_config(files, [*overrides, *EVAL_OVERRIDES]))
    chosen = load_config(files, overrides)
    if chosen.model.fp8 is not None:
        logger.info(
            "model.fp8=%s in training; evaluated without FP8 (bf16 on a GPU)", chosen.model.fp8
        )
    if len(files) > 1 or overrides:
        changed = list(_differences(load_config(config_file), chosen))
        if changed:
            logger.warning(
                "the evaluated model differs from %s, whose weights it loads: %s",
                config_file,
                ", ".join(changed),
            )
    return cfg


def _differences(saved: MM1Config, chosen: MM1Config) -> Iterator[str]:
    """``field=chosen (checkpoint: saved)`` for what describes the model and its inputs:
    ``model.*`` (but how the layers compute) and ``data.tokenizer.*``."""
    leaves = [
        *_leaves(saved.model, chosen.model, "model"),
        *_leaves(saved.data.tokenizer, chosen.data.tokenizer, "data.tokenizer"),
    ]
    for name, ours, theirs in leaves:
        if ours != theirs and name not in EVAL_CHOOSES:
            yield f"{name}={theirs} (checkpoint: {ours})"


def _leaves(old, new, prefix: str) -> Iterator[tuple]:
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a):
            yield from _leaves(a, b, f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", a, b


def _as_local_layers(cfg: MM1Config) -> MM1Config:
    """Local layers; TE's grouped experts as sequential ones (the same checkpoint keys)."""
    llm = cfg.model.llm
    moe = dataclasses.replace(llm.moe, grouped_gemm=None)
    model = dataclasses.replace(
        cfg.model, transformer_impl="local", llm=dataclasses.replace(llm, moe=moe)
    )
    return dataclasses.replace(cfg, model=model)


def layers_for_this_machine(cfg: MM1Config, *, cuda: bool) -> MM1Config:
    """The checkpoint's layer implementation where this machine runs it, else local layers
    (the same checkpoint keys, ``checkpoint/key_layout.py``), stated in the log: a TE run
    is evaluated on a laptop, and ``auto`` is decided here as in training."""
    impl = cfg.model.transformer_impl
    if impl == "local":
        return cfg
    te_version = transformer_engine_version() if cuda else None
    if impl == "transformer_engine" and (te_version is None or not cuda):
        logger.info(
            "the checkpoint's Transformer Engine layers are evaluated as local layers "
            "(%s): same weights",
            "no CUDA" if not cuda else "Transformer Engine does not import",
        )
        return _as_local_layers(cfg)
    resolved, lines = resolve_machine_settings(
        cfg, cuda=cuda, cuda_capability=None, te_version=te_version
    )
    for line in lines:
        logger.info("%s", line)
    local = resolved.model.transformer_impl == "local"
    return _as_local_layers(resolved) if local else resolved


def _check_layout_fits(cfg: MM1Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1")))
    p = cfg.parallel
    model_parallel = p.tensor_parallel_size * p.pipeline_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"the checkpoint's layout ({describe_layout(cfg)}) needs a multiple of "
            f"{model_parallel} processes, and {world} were started; evaluate at another "
            f"layout with overrides, e.g. parallel.tensor_parallel_size=1 "
            f"parallel.pipeline_parallel_size=1 parallel.expert_parallel_size=1"
        )


def load_eval_model(
    checkpoint: Path, overrides: Sequence[str] = (), *, cfg: Optional[MM1Config] = None
) -> EvalModel:
    """The model of ``checkpoint``, described by ``cfg`` (a ``checkpoint_config``) or else
    by ``checkpoint_config(checkpoint, overrides)``."""
    folder = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(folder, overrides) if cfg is None else cfg
    _check_layout_fits(cfg)
    ctx = init_distributed(cfg.parallel, timeout_minutes=cfg.parallel.collective_timeout_minutes)
    cfg = layers_for_this_machine(cfg, cuda=ctx.device.type == "cuda")
    seed_everything(cfg.training.seed)  # Megatron's RNG tracker must exist, even without dropout
    tokenizer = build_tokenizer(cfg.data.tokenizer.kind, cfg.data.tokenizer.path)
    cuda = ctx.device.type == "cuda"
    bf16 = cuda and cfg.training.precision in ("auto", "bf16")
    runtime = RuntimeOptions(
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_cpu_initialization=not cuda
    )
    model = build_mm1_model(
        cfg.model,
        cfg.parallel,
        image_token_id=tokenizer.image_token_id,
        runtime=runtime,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
    )
    model.to(ctx.device)
    _load_weights(model, folder, cfg, overrides)
    model.eval()
    step = layout.step_of(folder)
    step = -1 if step is None else step
    logger.info("evaluating %s (step %d) at %s", folder, step, describe_layout(cfg))
    return EvalModel(cfg, model, tokenizer, ctx, folder, step)


def _load_weights(model, folder: Path, cfg: MM1Config, overrides: Sequence[str]) -> None:
    """The checkpoint's weights; a LoRA run's (adapters only) on its recorded base, or on
    ``checkpoint.initial_weights=...`` given as an override, then merged into it: the same
    function (``models/lora.py``), without the adapters' extra products per token."""
    if not cfg.model.lora.enabled:
        load_model_weights(model, folder)
        return
    given = any(o.startswith("checkpoint.initial_weights=") for o in overrides)
    base = cfg.checkpoint.initial_weights if given else None
    base_folder = load_adapted_model(model, folder, base=base, model_config=cfg.model)
    merged = merge_adapters(model)
    logger.info("LoRA checkpoint on base %s: %d adapters merged", base_folder, merged)


def describe_layout(cfg: MM1Config) -> str:
    p = cfg.parallel
    return f"TP={p.tensor_parallel_size} PP={p.pipeline_parallel_size} EP={p.expert_parallel_size}"
