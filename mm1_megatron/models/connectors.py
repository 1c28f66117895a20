"""Vision-language connectors: encoder patch features -> LLM input tokens.

All take ``[n, num_patches, vision_hidden]`` (patches in row-major grid order, class
token already removed) and return ``[n, num_output_tokens, llm_hidden]``.

- ``CAbstractor``: MM1's choice (Honeybee's design). Learned grid position embedding,
  a stage of RegNet-style bottleneck blocks with squeeze-excite and LayerNorm2d,
  adaptive average pooling to the target grid, a second stage, then an MLP readout.
  Convolutions keep locality, pooling sets the token count.
- ``AvgPoolConnector``: average pooling to the target grid, then the MLP readout.
- ``AttnPoolConnector``: learned queries cross-attend to the patches.
- ``MLPConnector``: LLaVA-1.5 style, one token per patch.

Connectors are small and replicated on every tensor-parallel rank (see docs/parallelism.md,
"What is split and what is replicated").
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from mm1_megatron.config.schema import ConnectorConfig


def readout_mlp(in_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """Linear to ``out_dim`` followed by ``num_layers - 1`` (GELU, Linear) pairs."""
    layers = [nn.Linear(in_dim, out_dim)]
    for _ in range(num_layers - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _to_grid(features: torch.Tensor) -> torch.Tensor:
    """``[n, g*g, c]`` -> ``[n, c, g, g]``."""
    n, num_patches, channels = features.shape
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return features.transpose(1, 2).reshape(n, channels, side, side)


def _from_grid(grid: torch.Tensor) -> torch.Tensor:
    """``[n, c, h, w]`` -> ``[n, h*w, c]``."""
    return grid.flatten(2).transpose(1, 2)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, kernel_size=1)
        self.expand = nn.Conv2d(reduced, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean(dim=(2, 3), keepdim=True)
        scale = torch.sigmoid(self.expand(nn.functional.silu(self.reduce(scale))))
        return x * scale


class BottleneckBlock(nn.Module):
    """RegNet-style bottleneck: 1x1 -> 3x3 -> squeeze-excite -> 1x1, with a residual."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.norm1 = LayerNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.norm2 = LayerNorm2d(out_channels)
        self.squeeze_excite = SqueezeExcite(out_channels, max(1, in_channels // 4))
        self.conv3 = nn.Conv2d(out_channels, out_channels, kernel_size=1, bias=False)
        self.norm3 = LayerNorm2d(out_channels)
        self.shortcut = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.norm1(self.conv1(x)))
        y = nn.functional.silu(self.norm2(self.conv2(y)))
        y = self.norm3(self.conv3(self.squeeze_excite(y)))
        return nn.functional.silu(y + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, num_blocks: int) -> nn.Sequential:
    blocks = [
        BottleneckBlock(in_channels if i == 0 else out_channels, out_channels)
        for i in range(num_blocks)
    ]
    return nn.Sequential(*blocks)


class CAbstractor(nn.Module):
    def __init__(
        self,
        cfg: ConnectorConfig,
        vision_hidden: int,
        llm_hidden: int,
        num_patches: int,
        init_std: float,
    ):
        super().__init__()
        self.output_side = math.isqrt(cfg.num_output_tokens)
        self.position_embedding = nn.Parameter(torch.randn(num_patches, vision_hidden) * init_std)
        width = cfg.hidden_size if cfg.num_blocks_per_stage > 0 else vision_hidden
        self.stage1 = _stage(vision_hidden, width, cfg.num_blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(self.output_side)
        self.stage2 = _stage(width, width, cfg.num_blocks_per_stage)
        self.readout = readout_mlp(width, llm_hidden, cfg.num_readout_layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.position_embedding.shape[0]:
            raise ValueError(
                f"C-Abstractor was built for {self.position_embedding.shape[0]} "
                f"patches, got {features.shape[1]}"
            )
        grid = _to_grid(features + self.position_embedding)
        grid = self.stage2(self.pool(self.stage1(grid)))
        return self.readout(_from_grid(grid))


class AvgPoolConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(cfg.num_output_tokens))
        self.readout = readout_mlp(vision_hidden, llm_hidden, cfg.num_readout_layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.readout(_from_grid(self.pool(_to_grid(features))))


class AttnPoolConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int, init_std: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cfg.num_output_tokens, cfg.hidden_size) * init_std)
        self.norm = nn.LayerNorm(vision_hidden)
        self.attention = nn.MultiheadAttention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            kdim=vision_hidden,
            vdim=vision_hidden,
            batch_first=True,
        )
        self.readout = readout_mlp(cfg.hidden_size, llm_hidden, cfg.num_readout_layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        keys = self.norm(features)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        pooled, _ = self.attention(queries, keys, keys, need_weights=False)
        return self.readout(pooled)


class MLPConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, vision_hidden: int, llm_hidden: int):
        super().__init__()
        self.readout = readout_mlp(vision_hidden, llm_hidden, cfg.num_readout_layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.readout(features)


class Connector(MegatronModule):
    """Selects the connector named by ``cfg.type``; replicated across TP ranks."""

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
        std = config.init_method_std
        if cfg.type == "c_abstractor":
            self.net = CAbstractor(cfg, vision_hidden, llm_hidden, num_patches, std)
        elif cfg.type == "avg_pool":
            self.net = AvgPoolConnector(cfg, vision_hidden, llm_hidden)
        elif cfg.type == "attn_pool":
            self.net = AttnPoolConnector(cfg, vision_hidden, llm_hidden, std)
        elif cfg.type == "mlp":
            self.net = MLPConnector(cfg, vision_hidden, llm_hidden)
        else:
            raise ValueError(f"model.connector.type={cfg.type!r} is not a known connector")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)
