"""CLIP-style ViT image encoder built from a Megatron-Core ``TransformerBlock``.

Layout follows CLIP: patch convolution (no bias), optional class token, learned absolute
position embeddings, a pre-LayerNorm, then pre-norm transformer layers with
bidirectional attention. The output is the last layer's hidden states (CLIP's
``last_hidden_state``, without the post-LayerNorm that CLIP applies to the pooled token).

SigLIP's tower is the same with a patch-convolution bias, no class token, no
pre-LayerNorm and a post-LayerNorm on every output token (``patch_embedding_bias``,
``use_class_token``, ``pre_layernorm``, ``post_layernorm`` in ``model.vision``).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config.schema import VisionEncoderConfig
from mm1_megatron.hf_model.connectors_mm1 import resize_grid_table
from mm1_megatron.models.specs import vision_layer_spec


def interpolate_position_embedding(
    pos_embed: torch.Tensor, *, num_prefix_tokens: int, new_grid: int
) -> torch.Tensor:
    """Resize a ``[num_prefix + g*g, h]`` table to ``[num_prefix + new_grid**2, h]``.

    The patch rows are treated as a ``g x g`` image and resized bicubically (as CLIP and
    MM1 do when moving from 378 px to 672 px); prefix rows (class token) are kept.
    """
    prefix, grid_rows = pos_embed[:num_prefix_tokens], pos_embed[num_prefix_tokens:]
    resized = resize_grid_table(grid_rows, new_grid)
    if resized is grid_rows:
        return pos_embed
    return torch.cat([prefix, resized], dim=0)


class VisionEncoder(MegatronModule):
    """Images ``[n, c, H, W]`` -> patch features ``[n, num_patches, hidden]``."""

    def __init__(
        self,
        config: TransformerConfig,
        vision: VisionEncoderConfig,
        *,
        transformer_impl: str = "local",
    ):
        super().__init__(config=config)
        self.patch_size = vision.patch_size
        self.grid_size = vision.image_size // vision.patch_size
        self.num_prefix_tokens = 1 if vision.use_class_token else 0
        hidden = vision.hidden_size
        self.patch_embedding = torch.nn.Conv2d(
            vision.num_channels,
            hidden,
            kernel_size=vision.patch_size,
            stride=vision.patch_size,
            bias=vision.patch_embedding_bias,
        )
        std = config.init_method_std
        self.class_embedding = (
            torch.nn.Parameter(torch.randn(hidden) * std) if vision.use_class_token else None
        )
        num_positions = self.num_prefix_tokens + self.grid_size**2
        self.position_embedding = torch.nn.Parameter(torch.randn(num_positions, hidden) * std)
        self.pre_layernorm = (
            torch.nn.LayerNorm(hidden, eps=vision.layernorm_epsilon)
            if vision.pre_layernorm
            else None
        )
        self.transformer = TransformerBlock(
            config=config,
            spec=vision_layer_spec(transformer_impl),
            post_layer_norm=False,
            pre_process=True,
            post_process=False,
        )
        self.post_layernorm = (
            torch.nn.LayerNorm(hidden, eps=vision.layernorm_epsilon)
            if vision.post_layernorm
            else None
        )

    def position_table(self, grid_size: int) -> torch.Tensor:
        return interpolate_position_embedding(
            self.position_embedding, num_prefix_tokens=self.num_prefix_tokens, new_grid=grid_size
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        if height != width or height % self.patch_size:
            raise ValueError(
                f"images must be square multiples of {self.patch_size} px, got {height}x{width}"
            )
        grid_size = height // self.patch_size
        patches = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [n, g*g, h]
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(patches.shape[0], 1, -1)
            patches = torch.cat([cls, patches], dim=1)
        hidden = patches + self.position_table(grid_size)
        if self.pre_layernorm is not None:
            hidden = self.pre_layernorm(hidden)
        hidden = hidden.transpose(0, 1).contiguous()  # Megatron layout: [s, n, h]
        hidden = self.transformer(hidden_states=hidden, attention_mask=None)
        hidden = hidden.transpose(0, 1)[:, self.num_prefix_tokens :]  # drop the class token
        if self.post_layernorm is not None:
            hidden = self.post_layernorm(hidden)
        return hidden

    def set_input_tensor(self, input_tensor) -> None:
        self.transformer.set_input_tensor(input_tensor)
