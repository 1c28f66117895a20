"""``MM1ImageProcessor``: images -> the high-resolution tiles an MM1 model was tuned on.

It cuts every image exactly as training's data pipeline does (``data.tiling``), so the
exported model sees the pixels it was trained on, bit for bit:

- ``mode: static`` puts every image on the fixed ``static_grid`` of ``[cols, rows]``
  tiles; ``mode: dynamic`` picks, per image, the grid of ``min_tiles`` to ``max_tiles``
  tiles that covers it without down-scaling and has the smallest canvas (ties: least
  padding after the resize, then fewer rows), else the grid with the least down-scaling
  (ties: least padding, fewer tiles, fewer rows). Exact arithmetic (fractions).
- The image is resized by ``min(cols T / w, rows T / h)`` (aspect kept; rounded half to
  even), centred on the ``cols T x rows T`` canvas whose rest is the mean colour, and cut
  into ``T x T`` tiles in row-major order. The overview, the whole image resized to
  ``T x T``, goes ``after`` the tiles, ``before`` them, or nowhere (``none``).
- A sample (one prompt) with ``max_images_to_split`` images or more is not split: each of
  its images is one tile, its overview.
- Resizing is bilinear with antialiasing (``torch``), on ``float32`` pixels in [0, 1];
  then ``(x - mean) / std``.

Inputs: ``[3, H, W]`` tensors (float in [0, 1], or uint8), PIL images (EXIF orientation
applied, converted to RGB, then ``/ 255``), ``[H, W, 3]`` uint8 arrays, or paths, URLs and
base64 strings (the images of chat messages; opened by ``transformers``' ``load_image``,
which converts them to 8-bit RGB). One image or a flat list is the images of one sample;
a list of lists is a batch of samples. Output: ``pixel_values`` ``[num_tiles, 3, T, T]``
and ``num_tiles`` ``[num_images]`` (how many tiles, so how many ``<image>`` placeholders,
each image became).

This file travels with every exported MM1 model whose run tiles its images and is loaded
with ``trust_remote_code``: it imports only the standard library, torch and transformers.
"""

from __future__ import annotations

from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

MODES = ("static", "dynamic")
OVERVIEWS = ("after", "before", "none")
Grid = Tuple[int, int]  # (cols, rows)


def fit_scale(width: int, height: int, grid: Grid, tile_size: int) -> Fraction:
    """The aspect-keeping scale that fits a ``width x height`` image on ``grid``'s canvas."""
    cols, rows = grid
    return min(Fraction(cols * tile_size, width), Fraction(rows * tile_size, height))


def dynamic_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> Grid:
    """The grid ``mode: dynamic`` gives a ``width x height`` image (see the module doc)."""
    grids = [
        (cols, rows)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles // rows + 1)
        if min_tiles <= cols * rows
    ]
    scales = {grid: fit_scale(width, height, grid, tile_size) for grid in grids}

    def padding(grid: Grid) -> Fraction:  # canvas area left empty after the resize
        return grid[0] * grid[1] * tile_size**2 - scales[grid] ** 2 * width * height

    covering = [grid for grid in grids if scales[grid] >= 1]
    if covering:
        return min(covering, key=lambda g: (g[0] * g[1], padding(g), g[1]))
    return min(grids, key=lambda g: (-scales[g], padding(g), g[0] * g[1], g[1]))


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if image.shape[1] == height and image.shape[2] == width:
        return image
    resized = F.interpolate(
        image[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].clamp(0, 1)


def _eight_bit(image):
    """A PIL image whose pixels ``convert("RGB")`` maps right: 16-bit grey scaled to 8 bits
    (``round(v / 257)``) as training's decoder does, where Pillow would clip it to white;
    32-bit integer and float images refused, as training skips them."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 32-bit ints (no clipping), then v / 257 rounded: equal to training's
        # (v + 128) // 257 on all 65536 values (tested). EXIF travels in ``info``.
        return image.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    if image.mode in ("I", "F"):
        raise ValueError(
            f"unsupported pixel mode {image.mode} (32-bit integer or float pixels): convert "
            "the image to 8-bit RGB yourself"
        )
    return image


def _unit_pixels(image) -> torch.Tensor:
    """Any accepted image as a ``[3, H, W]`` float32 tensor in [0, 1]."""
    from transformers.image_utils import load_image

    if isinstance(image, str):  # a path, URL or base64 image, as chat messages give them
        image = load_image(image)
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
        image = load_image(_eight_bit(image))  # EXIF orientation applied, RGB
        width, height = image.size
        raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        image = raw.view(height, width, 3).permute(2, 0, 1)
    elif not isinstance(image, torch.Tensor) and hasattr(image, "__array__"):  # numpy
        image = torch.as_tensor(image)
        if image.dim() != 3 or image.shape[2] != 3:
            raise ValueError(
                f"an image array must be [H, W, 3] (RGB), got {tuple(image.shape)}; pass "
                "a [3, H, W] tensor for channels-first pixels"
            )
        image = image.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise ValueError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, a path or "
            "URL, a [3, H, W] tensor or an [H, W, 3] uint8 array"
        )
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(
            f"an image tensor must be [3, H, W] (RGB, channels first), got {tuple(image.shape)}"
        )
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise ValueError(f"image tensors must be uint8 or float in [0, 1], got {image.dtype}")
    if image.numel() and (float(image.min()) < 0 or float(image.max()) > 1):
        raise ValueError(
            "float image tensors must hold pixels in [0, 1] (uint8 tensors are divided by 255)"
        )
    return image.float()


def _samples(images) -> List[list]:
    """``images`` as a list of samples, each a list of images."""
    if images is None:
        return []
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        return [list(images)]
    if not isinstance(images, (list, tuple)):
        return [[images]]
    if images and all(isinstance(sample, (list, tuple)) for sample in images):
        return [list(sample) for sample in images]
    return [list(images)]


class MM1ImageProcessor(BaseImageProcessor):
    """Tiles images as MM1's fine-tuning pipeline did (``data.tiling`` of the run)."""

    # As transformers marks a class loaded with trust_remote_code: save_pretrained() then
    # writes this file next to the config and names it in auto_map.
    _auto_class = "AutoImageProcessor"

    model_input_names = ["pixel_values", "num_tiles"]

    def __init__(
        self,
        mode: str = "static",
        tile_size: int = 672,
        static_grid: Sequence[int] = (2, 2),
        min_tiles: int = 4,
        max_tiles: int = 9,
        overview: str = "after",
        max_images_to_split: int = 3,
        image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES} (training's data.tiling.mode)")
        if overview not in OVERVIEWS:
            raise ValueError(f"overview={overview!r} must be one of {OVERVIEWS}")
        if len(static_grid) != 2 or min(static_grid) < 1:
            raise ValueError(f"static_grid={list(static_grid)} must be [cols, rows], both >= 1")
        if not 1 <= min_tiles <= max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        if len(image_mean) != 3 or len(image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        self.mode, self.tile_size, self.overview = mode, int(tile_size), overview
        self.static_grid = [int(n) for n in static_grid]
        self.min_tiles, self.max_tiles = int(min_tiles), int(max_tiles)
        self.max_images_to_split = int(max_images_to_split)
        self.image_mean = [float(m) for m in image_mean]
        self.image_std = [float(s) for s in image_std]

    def plan(self, sizes: Sequence[Tuple[int, int]]) -> List[Optional[Grid]]:
        """The grid of each image of one sample, given ``(width, height)``s; None: one tile."""
        if len(sizes) >= self.max_images_to_split:
            return [None for _ in sizes]
        if self.mode == "static":
            return [tuple(self.static_grid) for _ in sizes]
        return [
            dynamic_grid(w, h, self.tile_size, self.min_tiles, self.max_tiles) for w, h in sizes
        ]

    def tiles(self, image: torch.Tensor, grid: Optional[Grid]) -> List[torch.Tensor]:
        """A ``[3, H, W]`` image in [0, 1] as its ``[3, T, T]`` tiles, in model order."""
        size = self.tile_size
        overview = _resize(image, size, size)
        if grid is None:
            return [overview]
        (cols, rows), (height, width) = grid, image.shape[1:]
        scale = fit_scale(width, height, grid, size)
        new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
        canvas_width, canvas_height = cols * size, rows * size
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        canvas = mean.repeat(1, canvas_height, canvas_width)
        left, top = (canvas_width - new_width + 1) // 2, (canvas_height - new_height + 1) // 2
        canvas[:, top : top + new_height, left : left + new_width] = _resize(
            image, new_height, new_width
        )
        cut = [
            canvas[:, r * size : (r + 1) * size, c * size : (c + 1) * size]
            for r in range(rows)
            for c in range(cols)
        ]
        if self.overview == "before":
            return [overview, *cut]
        return [*cut, overview] if self.overview == "after" else cut

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' (torch) is supported")
        if kwargs:
            raise ValueError(f"MM1ImageProcessor takes no options {sorted(kwargs)}")
        tiles: List[torch.Tensor] = []
        counts: List[int] = []
        for sample in _samples(images):
            pixels = [_unit_pixels(image) for image in sample]
            grids = self.plan([(int(p.shape[2]), int(p.shape[1])) for p in pixels])
            for image, grid in zip(pixels, grids):
                cut = self.tiles(image, grid)
                tiles += cut
                counts.append(len(cut))
        mean = torch.tensor(self.image_mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=torch.float32).view(3, 1, 1)
        size = self.tile_size
        stacked = torch.stack(tiles) if tiles else torch.zeros((0, 3, size, size))
        return BatchFeature(
            data={
                "pixel_values": (stacked - mean) / std,
                "num_tiles": torch.tensor(counts, dtype=torch.long),
            }
        )

    def __call__(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, **kwargs)
