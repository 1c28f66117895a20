"""Vision-language connectors: encoder patch features -> LLM input tokens.

All take ``[n, num_patches, vision_hidden]`` (patches in row-major grid order, class
token already removed) and return ``[n, num_output_tokens, llm_hidden]``. For a
native-resolution encoder, ``forward_grids(features, grids)`` takes the packed patches of
images of different grids instead (``[total_patches, vision_hidden]``, image ``i``'s
``h x w`` patches row-major after those of the images before it) and still returns
``num_output_tokens`` tokens per image; images that share a grid shape run as one batch.

- ``CAbstractor``: MM1's choice (Honeybee's design). Learned grid position embedding,
  a stage of RegNet-style bottleneck blocks with squeeze-excite and LayerNorm2d,
  adaptive average pooling to the target grid, a second stage, then an MLP readout.
  Convolutions keep locality, pooling sets the token count.
- ``AvgPoolConnector``: average pooling to the target grid, then the MLP readout.
- ``AttnPoolConnector``: learned queries cross-attend to the patches.
- ``MLPConnector``: LLaVA-1.5 style, one token per patch.

They are plain ``torch`` modules built from one table, ``CONNECTORS``, by
``build_connector_net``: training's Megatron ``Connector`` (``mm1_megatron.models.connectors``)
and the exported ``transformers`` model (``modeling_mm1``) both call it, so the two cannot
build different modules. This file is copied into every exported MM1 folder and must
import only the standard library and torch (see ``mm1_megatron/hf_model/__init__.py``).
Connectors are small and replicated on every tensor-parallel rank (see
docs/parallelism.md, "What is split and what is replicated").
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

GridShape = Tuple[int, int]  # (rows, cols) of an image's patch grid


def _field(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ValueError(
            f"the connector config {dict(config)} has no {key!r}, which a "
            f"{config.get('type')!r} connector needs"
        )
    return config[key]


def readout_mlp(in_dim: int, out_dim: int, num_layers: int) -> nn.Sequential:
    """Linear to ``out_dim`` followed by ``num_layers - 1`` (GELU, Linear) pairs."""
    layers = [nn.Linear(in_dim, out_dim)]
    for _ in range(num_layers - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def _square_shape(num_patches: int) -> GridShape:
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    return side, side


def _to_grid(features: torch.Tensor, shape: GridShape) -> torch.Tensor:
    """``[n, h*w, c]`` -> ``[n, c, h, w]``."""
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], *shape)


def resize_grid_table(table: torch.Tensor, size: Union[int, GridShape]) -> torch.Tensor:
    """A ``[g*g, c]`` table of a ``g x g`` grid, resized bicubically to ``size`` (a side,
    or the ``(rows, cols)`` of a non-square grid).

    How a model pre-trained at one resolution reads its position tables at another (CLIP
    and MM1 move 378 px to 672 px this way); the table itself keeps its shape, so the
    checkpoint loads unchanged. At the table's own grid it is returned as it is.
    """
    rows, cols = (size, size) if isinstance(size, int) else size
    old_side = math.isqrt(table.shape[0])
    if old_side * old_side != table.shape[0]:
        raise ValueError(f"position table has {table.shape[0]} rows, not a square grid")
    if (old_side, old_side) == (rows, cols):
        return table
    grid = table.reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(rows, cols), mode="bicubic", align_corners=False)
    return grid.to(table.dtype).permute(0, 2, 3, 1).reshape(rows * cols, -1)


# A grid with a side under the output side (2x8 patches into 12x12 tokens) is accepted:
# adaptive average pooling then repeats patches (or averages overlapping pairs), so some
# tokens are copies. NaFlex keeps aspect ratios, so very wide or tall images do give such
# grids, and refusing would stop a run at the first one; copies lose nothing and only fill
# tokens whose count the sequence layout fixes anyway. The square path already does this
# when num_output_tokens exceeds the patch count.
def _checked_grids(features: torch.Tensor, grids: Sequence[Sequence[int]]) -> List[GridShape]:
    if features.dim() != 2:
        raise ValueError(f"packed features must be [total_patches, hidden], not {features.shape}")
    shapes = [tuple(int(side) for side in grid) for grid in grids]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"grids must be one or more (rows, cols) of positive sides: {grids}")
    total = sum(rows * cols for rows, cols in shapes)
    if total != features.shape[0]:
        raise ValueError(f"grids {shapes} hold {total} patches, features {features.shape[0]}")
    return shapes


def map_grid_groups(
    features: torch.Tensor,
    grids: Sequence[Sequence[int]],
    per_shape: Callable[[torch.Tensor, GridShape], torch.Tensor],
) -> torch.Tensor:
    """``per_shape(images [k, h*w, c], (h, w)) -> [k, t, d]`` run once per distinct grid
    shape of the packed ``features``; returns ``[n_images, t, d]`` in the images' order.
    An image's output depends on its own patches only."""
    shapes = _checked_grids(features, grids)
    images = features.split([rows * cols for rows, cols in shapes])
    by_shape: Dict[GridShape, List[int]] = {}
    for index, shape in enumerate(shapes):
        by_shape.setdefault(shape, []).append(index)
    outputs = [per_shape(torch.stack([images[i] for i in ids]), s) for s, ids in by_shape.items()]
    order = [index for ids in by_shape.values() for index in ids]
    grouped = torch.cat(outputs)
    if order == sorted(order):
        return grouped
    return grouped[torch.argsort(torch.tensor(order, device=grouped.device))]


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


# Every connector takes the same arguments, so that one table builds any of them: the
# fields of ``model.connector`` as a mapping, then the shapes around it. Each reads only
# the fields and shapes it needs. The order in which parameters are created is part of
# the contract: it fixes the initial weights of a seeded run.
class CAbstractor(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        vision_hidden: int,
        llm_hidden: int,
        num_patches: int,
        init_std: float,
    ):
        super().__init__()
        num_blocks = _field(config, "num_blocks_per_stage")
        self.output_side = math.isqrt(_field(config, "num_output_tokens"))
        self.position_embedding = nn.Parameter(torch.randn(num_patches, vision_hidden) * init_std)
        width = _field(config, "hidden_size") if num_blocks > 0 else vision_hidden
        self.stage1 = _stage(vision_hidden, width, num_blocks)
        self.pool = nn.AdaptiveAvgPool2d(self.output_side)
        self.stage2 = _stage(width, width, num_blocks)
        self.readout = readout_mlp(width, llm_hidden, _field(config, "num_readout_layers"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._forward_shape(features, _square_shape(features.shape[1]))

    def forward_grids(self, features: torch.Tensor, grids: Sequence[GridShape]) -> torch.Tensor:
        return map_grid_groups(features, grids, self._forward_shape)

    def _forward_shape(self, features: torch.Tensor, shape: GridShape) -> torch.Tensor:
        # Another resolution (e.g. 672 px tiles after pre-training at 378 px) or a
        # non-square native grid reads the learned table resized to its grid. A grid with
        # a side under ``output_side`` is upsampled by the pool (see above _checked_grids).
        grid = _to_grid(features + resize_grid_table(self.position_embedding, shape), shape)
        grid = self.stage2(self.pool(self.stage1(grid)))
        return self.readout(_from_grid(grid))


class AvgPoolConnector(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        vision_hidden: int,
        llm_hidden: int,
        num_patches: int,
        init_std: float,
    ):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(math.isqrt(_field(config, "num_output_tokens")))
        self.readout = readout_mlp(vision_hidden, llm_hidden, _field(config, "num_readout_layers"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self._forward_shape(features, _square_shape(features.shape[1]))

    def forward_grids(self, features: torch.Tensor, grids: Sequence[GridShape]) -> torch.Tensor:
        return map_grid_groups(features, grids, self._forward_shape)

    def _forward_shape(self, features: torch.Tensor, shape: GridShape) -> torch.Tensor:
        return self.readout(_from_grid(self.pool(_to_grid(features, shape))))


class AttnPoolConnector(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        vision_hidden: int,
        llm_hidden: int,
        num_patches: int,
        init_std: float,
    ):
        super().__init__()
        width = _field(config, "hidden_size")
        self.queries = nn.Parameter(
            torch.randn(_field(config, "num_output_tokens"), width) * init_std
        )
        self.norm = nn.LayerNorm(vision_hidden)
        self.attention = nn.MultiheadAttention(
            width,
            _field(config, "num_attention_heads"),
            kdim=vision_hidden,
            vdim=vision_hidden,
            batch_first=True,
        )
        self.readout = readout_mlp(width, llm_hidden, _field(config, "num_readout_layers"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        keys = self.norm(features)
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        pooled, _ = self.attention(queries, keys, keys, need_weights=False)
        return self.readout(pooled)

    def forward_grids(self, features: torch.Tensor, grids: Sequence[GridShape]) -> torch.Tensor:
        # The queries read any number of patches; grouping by shape keeps each image's
        # keys unpadded, so its output is exactly that of the image alone.
        return map_grid_groups(features, grids, lambda images, _shape: self.forward(images))


class MLPConnector(nn.Module):
    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        vision_hidden: int,
        llm_hidden: int,
        num_patches: int,
        init_std: float,
    ):
        super().__init__()
        self.readout = readout_mlp(vision_hidden, llm_hidden, _field(config, "num_readout_layers"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.readout(features)

    def forward_grids(self, features: torch.Tensor, grids: Sequence[GridShape]) -> torch.Tensor:
        """Refused: one token per patch cannot give every grid ``num_output_tokens``
        tokens. Pooling first would make it the ``avg_pool`` connector, which exists."""
        raise ValueError(
            "model.connector.type='mlp' makes one token per patch, so images of different "
            "grids (a native-resolution encoder) cannot all get num_output_tokens tokens; "
            "set model.connector.type to 'avg_pool' (pooling, then this MLP), "
            "'c_abstractor' or 'attn_pool'"
        )


# ``model.connector.type`` -> class. The config schema's ``ConnectorType`` lists the same
# names (a test keeps the two equal).
CONNECTORS = {
    "c_abstractor": CAbstractor,
    "avg_pool": AvgPoolConnector,
    "attn_pool": AttnPoolConnector,
    "mlp": MLPConnector,
}


def build_connector_net(
    connector_config: Mapping[str, Any],
    *,
    vision_hidden: int,
    llm_hidden: int,
    num_patches: int,
    init_std: float,
) -> nn.Module:
    """The connector named by ``connector_config["type"]``. ``connector_config`` holds the
    fields of ``model.connector`` (``dataclasses.asdict`` in training, the exported
    config's ``connector_config``); ``init_std`` scales the raw parameters' initial values."""
    kind = connector_config.get("type")
    if kind not in CONNECTORS:
        raise ValueError(
            f"model.connector.type={kind!r} is not a known connector; choose "
            f"one of {sorted(CONNECTORS)}"
        )
    return CONNECTORS[kind](
        connector_config,
        vision_hidden=vision_hidden,
        llm_hidden=llm_hidden,
        num_patches=num_patches,
        init_std=init_std,
    )
