"""Build an ``MM1Model`` for one pipeline stage from the run config."""

from __future__ import annotations

from typing import Optional

from mm1_megatron.config.schema import ModelConfig, ParallelConfig
from mm1_megatron.models.mm1_model import MM1Model
from mm1_megatron.models.transformer_configs import (
    RuntimeOptions,
    language_transformer_config,
    vision_transformer_config,
)


def build_mm1_model(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    image_token_id: int,
    runtime: RuntimeOptions = RuntimeOptions(),
    pre_process: bool = True,
    post_process: bool = True,
    init_seed: Optional[int] = None,
    adapter_seed: int = 0,
) -> MM1Model:
    """Construct the model (parameters on CPU when ``runtime.use_cpu_initialization``).

    With ``init_seed`` the weights are the same for every TP/PP layout (models/seeding.py);
    LoRA adapters (``model.lora``) are drawn from ``adapter_seed`` at any layout.
    """
    return MM1Model(
        model,
        language_config=language_transformer_config(model, parallel, runtime),
        vision_config=vision_transformer_config(model, parallel, runtime),
        image_token_id=image_token_id,
        pre_process=pre_process,
        post_process=post_process,
        init_seed=init_seed,
        adapter_seed=adapter_seed,
    )
