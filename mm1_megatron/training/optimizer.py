"""Megatron-Core AdamW (optionally distributed) and its LR/WD scheduler."""

from __future__ import annotations

from typing import Dict, List

import torch
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer, get_standard_config_overrides
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride

from mm1_megatron.config.schema import ModelPart, OptimizerConfig


def _lr_multiplier_overrides(
    multipliers: Dict[ModelPart, float], peak_lr: float, min_lr: float
) -> Dict[ParamKey, ParamGroupOverride]:
    """Parameters under ``<module>.`` get ``multiplier x`` the peak and floor LR."""
    overrides = {}
    for module_name, multiplier in multipliers.items():
        if multiplier == 1.0:
            continue
        key = ParamKey(name=(f"*{module_name}.*",))
        overrides[key] = ParamGroupOverride(max_lr=peak_lr * multiplier, min_lr=min_lr * multiplier)
    return overrides


def build_optimizer(
    o: OptimizerConfig,
    model_chunks: List,
    *,
    peak_lr: float,
    bf16: bool,
    use_distributed_optimizer: bool,
):
    min_lr = peak_lr * o.min_lr_ratio
    mcore_config = McoreOptimizerConfig(
        optimizer="adam",  # Megatron's "adam" is AdamW: decoupled weight decay
        lr=peak_lr,
        min_lr=min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    overrides = get_standard_config_overrides(mcore_config)  # no decay on norms and biases
    overrides.update(_lr_multiplier_overrides(o.lr_multipliers, peak_lr, min_lr))
    return get_megatron_optimizer(mcore_config, model_chunks, config_overrides=overrides)


def build_scheduler(
    o: OptimizerConfig, optimizer, *, peak_lr: float, train_steps: int
) -> OptimizerParamScheduler:
    """Linear warmup from 0, cosine decay to ``min_lr_ratio * peak`` at the last step."""
    steps = train_steps
    warmup = min(o.warmup_steps, steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=peak_lr,
        min_lr=peak_lr * o.min_lr_ratio,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(steps, warmup + 1),
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )
