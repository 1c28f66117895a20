"""Native resolution (SigLIP 2 NaFlex, ``model.vision.native_resolution``): each image at its
own aspect ratio under a patch budget, and a sequence's images as packed patches.

**The size rule** (``NativeResolution.image_size``) is ``Siglip2ImageProcessor``'s, so a
model trained here sees what the exported processor gives it. Both sides of an ``H x W``
image are scaled by one factor ``s`` and rounded *up* to a multiple of the patch size
``p`` (at least one patch each), and ``s`` is the largest scale whose patch count
``ceil(H s / p) * ceil(W s / p)`` stays within ``max_patches``: small images are enlarged
(at most 100x), large ones shrunk, and the aspect ratio is kept up to that rounding. The
processor finds ``s`` by bisection over ``(1e-6, 100)`` down to an interval of ``1e-5``,
and so does this rule: where the two sides' rounding steps fall closer together than that
(about 1 in 4,000 photos of several megapixels) both give a grid one row or column short
of the exact optimum, the same grid.

**Pixels**: the PIL decoder resizes the 8-bit image to that size with Pillow's bilinear
filter (antialiased when shrinking), as the processor's PIL backend does, then
normalises ``(x / 255 - mean) / std`` (``images.py``); the synthetic world draws its scenes
at that size directly. ``NativeResolution.pack`` then lays a sequence's images out as one packed
``[total_patches, c * p * p]`` tensor in Siglip2's patch order (``batch/image_patches``)
with their ``[n, 2]`` patch grids; ``batch/contract.py`` states the micro-batch format.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from mm1_megatron.batch.image_patches import patch_grid_view
from mm1_megatron.config.schema import VisionEncoderConfig
from mm1_megatron.data.pipeline.shared_memory import shared_in_worker

# SigLIP 2's processor searches the scale over (SMALLEST_SCALE, LARGEST_SCALE) until the
# interval is narrower than SCALE_RESOLUTION.
SMALLEST_SCALE, LARGEST_SCALE, SCALE_RESOLUTION = 1e-6, 100.0, 1e-5


@dataclass(frozen=True)
class NativeResolution:
    """Each image's patch budget; ``None`` in its place means fixed-size square images."""

    patch_size: int
    max_patches: int
    num_channels: int = 3

    def __post_init__(self):
        if self.patch_size < 1 or self.max_patches < 1:
            raise ValueError(
                f"native resolution needs model.vision.patch_size={self.patch_size} and "
                f"model.vision.max_patches={self.max_patches} both >= 1"
            )

    @property
    def patch_width(self) -> int:
        """Values per patch: ``c * p * p``."""
        return self.num_channels * self.patch_size**2

    def grid(self, height: int, width: int) -> Tuple[int, int]:
        """``(rows, cols)`` of patches for an ``height x width`` px image (module doc)."""
        if height < 1 or width < 1:
            raise ValueError(f"an image of {height}x{width} px has no pixels to resize")
        low, high = SMALLEST_SCALE, LARGEST_SCALE
        while high - low >= SCALE_RESOLUTION:
            middle = (low + high) / 2
            rows, cols = self._grid_at(middle, height, width)
            if rows * cols <= self.max_patches:
                low = middle
            else:
                high = middle
        return self._grid_at(low, height, width)

    def image_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(height, width)`` in pixels an image is resized to (module doc)."""
        rows, cols = self.grid(height, width)
        return rows * self.patch_size, cols * self.patch_size

    def _grid_at(self, scale: float, height: int, width: int) -> Tuple[int, int]:
        p = self.patch_size
        return max(1, math.ceil(height * scale / p)), max(1, math.ceil(width * scale / p))

    def empty(self, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """The patches and grids of a sequence without images."""
        return torch.zeros((0, self.patch_width), dtype=dtype), empty_grids()

    def pack(self, images: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``[c, h, w]`` images (sides multiples of ``p``, each within the
        budget) -> packed patches ``[total_patches, c*p*p]`` and grids ``[n, 2]`` int64.
        In a DataLoader worker the patches are written once, into shared memory."""
        if not images:
            return self.empty()
        grids = [self._checked_grid(image) for image in images]
        counts = [rows * cols for rows, cols in grids]
        shape = (sum(counts), self.patch_width)
        dtype = functools.reduce(torch.promote_types, [image.dtype for image in images])
        patches = shared_in_worker(shape, images[0].new_empty(0, dtype=dtype))
        if patches is None:
            patches = torch.empty(shape, dtype=dtype)
        for image, rows in zip(images, patches.split(counts)):
            view = patch_grid_view(image, self.patch_size)
            rows.view(view.shape).copy_(view)
        return patches, torch.tensor(grids, dtype=torch.long)

    def _checked_grid(self, image: torch.Tensor) -> Tuple[int, int]:
        channels, height, width = image.shape
        p = self.patch_size
        if channels != self.num_channels or height % p or width % p:
            raise ValueError(
                f"an image of shape {tuple(image.shape)} is not {self.num_channels} channels "
                f"of whole {p}-px patches; resize it with NativeResolution.image_size"
            )
        rows, cols = height // p, width // p
        if rows * cols > self.max_patches:
            raise ValueError(
                f"an image of {rows}x{cols} patches exceeds model.vision.max_patches="
                f"{self.max_patches}; resize it with NativeResolution.image_size"
            )
        return rows, cols


def empty_grids() -> torch.Tensor:
    return torch.zeros((0, 2), dtype=torch.long)


def native_resolution_of(vision: VisionEncoderConfig) -> Optional[NativeResolution]:
    """The encoder's patch budget when ``model.vision.native_resolution`` is on, else None."""
    if not vision.native_resolution:
        return None
    return NativeResolution(vision.patch_size, vision.max_patches, vision.num_channels)


def normalise_native_images(
    images: Sequence[torch.Tensor],
    native: NativeResolution,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[c, h, w]`` images in [0, 1] at their rule sizes -> ``(x - mean) / std`` packed."""
    mean = torch.tensor(image_mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(-1, 1, 1)
    return native.pack([(image.float() - mean) / std for image in images])
