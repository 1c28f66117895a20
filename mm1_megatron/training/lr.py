"""Peak learning rate: MM1's rule from the non-embedding parameter count, or fixed."""

from __future__ import annotations

import math

from mm1_megatron.config.schema import OptimizerConfig

MM1_LR_SLOPE = -0.4214
MM1_LR_INTERCEPT = -0.5535


def mm1_peak_lr(num_non_embedding_params: int) -> float:
    """MM1 (arXiv 2403.09611): ``lr = exp(-0.4214 * ln(N) - 0.5535)``."""
    if num_non_embedding_params <= 0:
        raise ValueError("the MM1 learning-rate rule needs a positive parameter count")
    return math.exp(MM1_LR_SLOPE * math.log(num_non_embedding_params) + MM1_LR_INTERCEPT)


def resolve_peak_lr(optimizer: OptimizerConfig, num_non_embedding_params: int) -> float:
    """``optimizer.lr`` when ``lr_rule=fixed``; otherwise the MM1 rule.

    ``N`` is the language model's non-embedding parameter count, counting only the
    top-k experts of MoE layers (the parameters each token uses).
    """
    if optimizer.lr_rule == "fixed":
        return float(optimizer.lr)
    return mm1_peak_lr(num_non_embedding_params)
