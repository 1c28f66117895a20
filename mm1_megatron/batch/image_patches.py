"""Images at their native resolution as packed patches: the ViT's NaFlex input contract.

An image of ``h x w`` patches of ``p x p`` pixels is ``h * w`` rows of ``p * p * c``
values, in row-major patch order and, within a patch, pixel row, pixel column, channel
(channel last): the layout of transformers' ``Siglip2ImageProcessor``, so its
``pixel_values`` (without the padding rows) and ours are the same numbers. Several
images are packed by concatenating their rows; each image's patch grid ``(h, w)``
travels beside them on the host, and says where one image ends and the next begins.

Here rather than in ``models``, so the data pipeline may build these inputs: ``batch``
imports neither ``data`` nor ``models``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

GridSizes = List[Tuple[int, int]]  # per image: (rows, columns) of patches


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., c, H, W]`` -> ``[..., (H/p) * (W/p), p * p * c]`` in Siglip2's layout."""
    *batch, channels, _, _ = images.shape
    grid = patch_grid_view(images, patch_size)
    rows, cols = grid.shape[-5:-3]
    return grid.reshape(*batch, rows * cols, patch_size * patch_size * channels)


def patch_grid_view(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., c, H, W]`` -> a view ``[..., H/p, W/p, p, p, c]``: the patches in Siglip2's
    order, not yet copied (``copy_`` it into its rows of a packed batch)."""
    *batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"an image of {height}x{width} px does not split into {patch_size}-px patches; "
            f"resize it to multiples of {patch_size}"
        )
    rows, cols = height // patch_size, width // patch_size
    grid = images.reshape(*batch, channels, rows, patch_size, cols, patch_size)
    dims = len(batch)
    # [..., c, rows, py, cols, px] -> [..., rows, cols, py, px, c]
    return grid.permute(*range(dims), dims + 1, dims + 3, dims + 2, dims + 4, dims)


def grid_sizes_of(grid_sizes) -> GridSizes:
    """``(h, w)`` pairs as Python ints, from a list of pairs or a host ``[n, 2]`` tensor."""
    if isinstance(grid_sizes, torch.Tensor) and grid_sizes.device.type != "cpu":
        raise ValueError(
            "grid_sizes must be on the host (a list of (h, w) pairs or a CPU tensor): reading "
            "them from the device would stall every step"
        )
    sizes = [tuple(int(n) for n in pair) for pair in grid_sizes]
    bad = [pair for pair in sizes if len(pair) != 2 or min(pair) < 1]
    if bad or not sizes:
        raise ValueError(
            f"grid_sizes must hold one (rows, columns) pair of positive patch counts per "
            f"image; got {list(grid_sizes) if not sizes else bad}"
        )
    return sizes


def image_ids(grid_sizes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``[1, total_patches]`` host ids: which image each packed patch belongs to. The
    ViT's attention takes them where the decoder's takes document ids."""
    counts = torch.tensor([h * w for h, w in grid_sizes])
    return torch.repeat_interleave(torch.arange(len(counts)), counts).unsqueeze(0)


def select_images(images: torch.Tensor, image_grids, which: torch.Tensor):
    """The images numbered ``which`` (ascending): ``[k, c, H, W]`` from ``[n, c, H, W]``
    (``image_grids`` None), or at native resolution their packed patch rows and host
    grids from ``[total_patches, c*p*p]`` and ``image_grids``. ``(images, grids)``."""
    if image_grids is None:
        return images.index_select(0, which.to(images.device)), None
    sizes = grid_sizes_of(image_grids)
    starts = [0]
    for rows, cols in sizes:
        starts.append(starts[-1] + rows * cols)
    chosen = which.tolist()  # one host read: the grids live on the host
    rows = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in chosen])
    grids = torch.tensor([sizes[i] for i in chosen], dtype=torch.long)
    return images.index_select(0, rows.to(images.device)), grids
