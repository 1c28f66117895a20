"""CLIP-style ViT image encoder built from a Megatron-Core ``TransformerBlock``.

Layout follows CLIP: patch convolution (no bias), optional class token, learned absolute
position embeddings, a pre-LayerNorm, then pre-norm transformer layers with
bidirectional attention. The output is the last layer's hidden states (CLIP's
``last_hidden_state``, without the post-LayerNorm that CLIP applies to the pooled token).

SigLIP's tower is the same with a patch-convolution bias, no class token, no
pre-LayerNorm and a post-LayerNorm on every output token (``patch_embedding_bias``,
``use_class_token``, ``pre_layernorm``, ``post_layernorm`` in ``model.vision``).

Native resolution (``model.vision.native_resolution``: SigLIP 2's NaFlex tower)
----------------------------------------------------------------------------------
Each image keeps its aspect ratio: an image of ``h x w`` patches is ``h * w`` rows of
``p * p * c`` pixel values (``batch/image_patches.py``: Siglip2's layout, so
``Siglip2ImageProcessor``'s ``pixel_values`` without their padding rows are valid input),
embedded by a linear layer (``patch_embedding``, SigLIP 2's ``nn.Linear(c*p*p, hidden)``),
plus the ``g x g`` position table resized to ``(h, w)`` as SigLIP 2 does
(``models/naflex.py``). The images of a batch are packed into one sequence, and attention
stays within each image (``ImageDocumentAttention``; Transformer Engine: THD with
``cu_seqlens``), so an image's features do not depend on what it is packed with.

For ``MM1Model`` (or any caller)::

    features = encoder.encode_packed(patches, grid_sizes)
    # patches:    [total_patches, c * p * p], images one after another
    # grid_sizes: per image (h, w), on the host: a list of pairs or a CPU [n, 2] tensor
    # features:   [total_patches, hidden], after the post-LayerNorm, in the same order;
    #             image i's rows are features.split([h * w for h, w in grid_sizes])[i]

Each image needs ``h * w <= model.vision.max_patches``. ``encoder(images)`` still takes a
batch ``[n, c, H, W]`` of equal-size images (any aspect ratio, multiples of ``p``) and
returns ``[n, (H/p) * (W/p), hidden]``: packing them gives the same features up to
rounding (the batch runs as ``n`` rows, the packed images as one). The ViT is
split only by tensor parallelism; every TP rank gets the whole packed sequence.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.batch.documents import register_host_document_ids
from mm1_megatron.batch.image_patches import grid_sizes_of, image_ids, patchify
from mm1_megatron.config.schema import VisionEncoderConfig
from mm1_megatron.hf_model.connectors_mm1 import resize_grid_table
from mm1_megatron.models.naflex import packed_position_embeddings, resize_position_grid
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


def _patch_embedding(vision: VisionEncoderConfig) -> torch.nn.Module:
    if vision.native_resolution:  # over flattened patches, as SigLIP 2's NaFlex tower
        return torch.nn.Linear(
            vision.num_channels * vision.patch_size**2,
            vision.hidden_size,
            bias=vision.patch_embedding_bias,
        )
    return torch.nn.Conv2d(
        vision.num_channels,
        vision.hidden_size,
        kernel_size=vision.patch_size,
        stride=vision.patch_size,
        bias=vision.patch_embedding_bias,
    )


class VisionEncoder(MegatronModule):
    """Images ``[n, c, H, W]`` -> patch features ``[n, num_patches, hidden]``; with
    ``native_resolution`` also packed images (``encode_packed``, see the module doc)."""

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
        self.native_resolution = vision.native_resolution
        self.max_patches = vision.max_patches
        hidden = vision.hidden_size
        self.patch_embedding = _patch_embedding(vision)
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
            spec=vision_layer_spec(transformer_impl, per_image_attention=vision.native_resolution),
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
        if self.native_resolution:
            return self._forward_native_batch(images)
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

    # ---- native resolution -------------------------------------------------------------
    def encode_packed(self, patches: torch.Tensor, grid_sizes) -> torch.Tensor:
        """Packed images ``[total_patches, c*p*p]`` with their patch grids (host ``(h, w)``
        pairs) -> features ``[total_patches, hidden]``; see the module doc."""
        if not self.native_resolution:
            raise ValueError(
                "packed images need the native-resolution ViT: set "
                "model.vision.native_resolution=true (SigLIP 2 NaFlex)"
            )
        sizes = grid_sizes_of(grid_sizes)
        self._check_packed(patches, sizes)
        weight = self.patch_embedding.weight
        hidden = self.patch_embedding(patches.to(weight.dtype)) + packed_position_embeddings(
            self.position_embedding, self.grid_size, sizes
        )
        ids = None
        if len(sizes) > 1:  # one image needs no ids: plain bidirectional attention
            host_ids = image_ids(sizes)
            ids = host_ids.to(patches.device)
            register_host_document_ids(ids, host_ids)
        return self._layers(hidden.unsqueeze(1), ids).squeeze(1)

    def _forward_native_batch(self, images: torch.Tensor) -> torch.Tensor:
        """``[n, c, H, W]`` of one size (any aspect ratio): no ids, one grid for all."""
        height, width = images.shape[-2:]
        size = (height // self.patch_size, width // self.patch_size)
        patches = patchify(images, self.patch_size)
        self._check_budget([size])
        weight = self.patch_embedding.weight
        hidden = self.patch_embedding(patches.to(weight.dtype)) + resize_position_grid(
            self.position_embedding, self.grid_size, size
        )
        hidden = self._layers(hidden.transpose(0, 1).contiguous(), None)
        return hidden.transpose(0, 1)

    def _layers(self, hidden: torch.Tensor, ids) -> torch.Tensor:
        """``[s, b, h]`` embeddings -> features: the transformer (``ids``: each position's
        image, or None for one image per row) and SigLIP's post-norm (the native-resolution
        stem has no class token and no pre-norm)."""
        assert self.num_prefix_tokens == 0 and self.pre_layernorm is None
        hidden = self.transformer(hidden_states=hidden, attention_mask=ids)
        return hidden if self.post_layernorm is None else self.post_layernorm(hidden)

    def _check_packed(self, patches: torch.Tensor, sizes) -> None:
        width = self.patch_embedding.in_features
        total = sum(h * w for h, w in sizes)
        if patches.dim() != 2 or patches.shape != (total, width):
            raise ValueError(
                f"packed patches must be [total_patches, c*p*p] = [{total}, {width}] for "
                f"grids {sizes}; got {list(patches.shape)}"
            )
        self._check_budget(sizes)

    def _check_budget(self, sizes) -> None:
        over = [(h, w) for h, w in sizes if h * w > self.max_patches]
        if over:
            raise ValueError(
                f"images of {over} patches exceed model.vision.max_patches="
                f"{self.max_patches}; resize them to at most {self.max_patches} patches"
            )

    def set_input_tensor(self, input_tensor) -> None:
        self.transformer.set_input_tensor(input_tensor)
