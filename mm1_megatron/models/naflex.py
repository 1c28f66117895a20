"""Position embeddings of the native-resolution (NaFlex) ViT: one learned ``g x g`` table,
resized to each image's own patch grid ``(h, w)``.

The resize is SigLIP 2's: bilinear with ``align_corners=False`` and antialiasing, in fp32,
cast back to the table's dtype (transformers' ``Siglip2VisionEmbeddings``). Bilinear
resizing is separable and linear, so an ``(h, w)`` table is ``R_h @ T @ R_w^T`` per
channel, where ``R_n`` (``[n, g]``) holds each output row's weights over the ``g`` source
rows: a triangle filter centred on the output position, widened by the downscale factor
when ``n < g`` (the antialiasing), normalised to sum to 1.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch


def antialiased_bilinear_weights(source: int, target: int, device=None) -> torch.Tensor:
    """``[target, source]`` fp32: transformers' Siglip2 resize (bilinear,
    ``align_corners=False``, antialiased) along one axis, as a matrix. It equals
    ``F.interpolate(..., antialias=True)`` except where one side of the output is 1 and
    the other is upsampled, where torch's kernel gives other values."""
    scale = source / target
    support = max(scale, 1.0)  # the filter widens when shrinking: the antialiasing
    centres = (torch.arange(target, device=device, dtype=torch.float32) + 0.5) * scale - 0.5
    taps = torch.arange(source, device=device, dtype=torch.float32)
    weights = (1 - (taps[None, :] - centres[:, None]).abs() / support).clamp(min=0)
    return weights / weights.sum(dim=1, keepdim=True)


def resize_position_grid(table: torch.Tensor, grid: int, size: Tuple[int, int]) -> torch.Tensor:
    """``[grid * grid, hidden]`` (row-major) -> ``[h * w, hidden]`` for an ``h x w`` image.

    At ``(grid, grid)`` the weights are the identity, so the table itself is returned."""
    rows, cols = size
    if (rows, cols) == (grid, grid):
        return table
    row_weights = antialiased_bilinear_weights(grid, rows, table.device)
    col_weights = antialiased_bilinear_weights(grid, cols, table.device)
    square = table.float().reshape(grid, grid, -1)
    resized = torch.einsum("ia,jb,abc->ijc", row_weights, col_weights, square)
    return resized.reshape(rows * cols, -1).to(table.dtype)


def packed_position_embeddings(
    table: torch.Tensor, grid: int, grid_sizes: Sequence[Tuple[int, int]]
) -> torch.Tensor:
    """``[sum(h * w), hidden]``: each image's resized table, in packing order. Images of the
    same grid share one resize."""
    resized: Dict[Tuple[int, int], torch.Tensor] = {}
    for size in grid_sizes:
        if size not in resized:
            resized[size] = resize_position_grid(table, grid, size)
    return torch.cat([resized[size] for size in grid_sizes])
