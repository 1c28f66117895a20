"""Training's vision-language connector: a ``MegatronModule`` around a plain torch one.

The connectors themselves (C-Abstractor, average pooling, attention pooling, MLP) live in
``mm1_megatron/hf_model/connectors_mm1.py``, where one table (``CONNECTORS``) builds them
for training and for the exported ``transformers`` model alike: that file also ships in
every exported folder, so it imports nothing of ours or of Megatron-Core. This wrapper
only gives the module Megatron's interface; the connector is ``.net``, so parameter names
(``connector.net.*``) are what checkpoints and the exporter's name mapping expect.
Connectors are small and replicated on every tensor-parallel rank (see docs/parallelism.md,
"What is split and what is replicated").
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config.schema import ConnectorConfig
from mm1_megatron.hf_model.connectors_mm1 import build_connector_net


class Connector(MegatronModule):
    """The connector named by ``cfg.type``, initialised with ``config.init_method_std``."""

    def __init__(
        self,
        config: TransformerConfig,
        cfg: ConnectorConfig,
        *,
        vision_hidden: int,
        llm_hidden: int,
        num_patches: int,
    ):
        super().__init__(config=config)
        self.net = build_connector_net(
            dataclasses.asdict(cfg),
            vision_hidden=vision_hidden,
            llm_hidden=llm_hidden,
            num_patches=num_patches,
            init_std=config.init_method_std,
        )

    def forward(
        self, features: torch.Tensor, grids: Optional[Sequence[Tuple[int, int]]] = None
    ) -> torch.Tensor:
        """``[n, g*g, vision_hidden]`` square grids, or with ``grids`` (a native-resolution
        encoder) the packed ``[total_patches, vision_hidden]`` patches of images whose
        ``(rows, cols)`` grids these are -> ``[n, num_output_tokens, llm_hidden]``. The
        ``mlp`` connector refuses ``grids`` (one token per patch; see its ``forward_grids``)."""
        if grids is None:
            return self.net(features)
        return self.net.forward_grids(features, grids)
