"""High-resolution tiling plans: which tiles an image becomes (pure, no pixels).

MM1 fine-tunes at 1344x1344 as four 672x672 crops plus a 672x672 overview of the whole
image; MM1.5 picks the grid per image. Both are plans here: a grid of ``cols x rows``
tiles of ``tile_size`` pixels cut in row-major order from a canvas of ``cols * tile_size``
by ``rows * tile_size`` pixels, and an overview (the whole image at ``tile_size``) placed
before or after the sub-images, or left out.

**Dynamic grid selection** (MM1.5: "the grid that covers the image with least padding,
else least down-scaling"), for an image of ``w x h`` pixels and tile side ``T``, over the
grids with ``min_tiles <= cols * rows <= max_tiles``:

- the image is resized by ``s = min(cols T / w, rows T / h)`` (aspect ratio kept, up or
  down) onto the canvas, and the rest of the canvas is padding;
- a grid *covers* the image when ``s >= 1`` (no pixel lost). If some grid covers it, the
  chosen one has the smallest canvas (least padding at the image's own resolution); ties
  go to the least padding after the resize (the best aspect match), then to fewer rows;
- otherwise the chosen grid has the largest ``s`` (least down-scaling); ties (grids
  whose other side has room to spare) go to fewer tiles, which is also less padding,
  then fewer rows.

Arithmetic is exact (fractions), so ties are real ties and the choice does not depend
on rounding. ``tests/data/test_tiling.py`` checks it against a brute-force search.

**Splitting off:** a sample with ``max_images_to_split`` or more images is not split:
each of its images is one ``tile_size`` tile (MM1.5 turns splitting off at 3 images).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from mm1_megatron.config.schema import TilingConfig
from mm1_megatron.data.pipeline.packing import Image, ImageShape, Sample, image_height_width


@dataclass(frozen=True)
class Grid:
    cols: int
    rows: int

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one image, in the order the model sees them."""

    grid: Optional[Grid]  # None: not split, the image is one tile (its overview)
    overview: str  # "after", "before" or "none" (only meaningful with a grid)

    @property
    def num_tiles(self) -> int:
        if self.grid is None:
            return 1
        return self.grid.num_tiles + (0 if self.overview == "none" else 1)

    def order(self) -> List[str]:
        """``"overview"`` and ``"tile r,c"`` names in model order (row-major tiles)."""
        if self.grid is None:
            return ["overview"]
        tiles = [f"tile {r},{c}" for r in range(self.grid.rows) for c in range(self.grid.cols)]
        if self.overview == "before":
            return ["overview", *tiles]
        if self.overview == "after":
            return [*tiles, "overview"]
        return tiles


def tile_size(settings: TilingConfig) -> Optional[int]:
    """The side of the images the encoder sees when tiling is on; None when it is off."""
    return None if settings.mode == "none" else settings.tile_size


def resize_scale(width: int, height: int, grid: Grid, tile_size: int) -> Fraction:
    """The aspect-preserving scale that fits a ``width x height`` image on the canvas."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} must be positive")
    return min(Fraction(grid.cols * tile_size, width), Fraction(grid.rows * tile_size, height))


def candidate_grids(min_tiles: int, max_tiles: int) -> List[Grid]:
    return [
        Grid(cols, rows)
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles // rows + 1)
        if cols * rows >= min_tiles
    ]


def select_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> Grid:
    """MM1.5's dynamic grid for one image (rules in the module docstring)."""
    grids = candidate_grids(min_tiles, max_tiles)
    area = width * height
    scales = {grid: resize_scale(width, height, grid, tile_size) for grid in grids}

    def padding_after_resize(grid: Grid) -> Fraction:
        return grid.num_tiles * tile_size**2 - scales[grid] ** 2 * area

    covering = [grid for grid in grids if scales[grid] >= 1]
    if covering:
        return min(covering, key=lambda g: (g.num_tiles, padding_after_resize(g), g.rows))
    return min(grids, key=lambda g: (-scales[g], padding_after_resize(g), g.num_tiles, g.rows))


def plan_tiles(sizes: Sequence[Tuple[int, int]], settings: TilingConfig) -> List[TilePlan]:
    """The tile plan of every image of one sample, given each image's ``(width, height)``."""
    unsplit = TilePlan(grid=None, overview="after")
    if settings.mode == "none" or len(sizes) >= settings.max_images_to_split:
        return [unsplit for _ in sizes]
    if settings.mode == "static":
        grid = Grid(*settings.static_grid)
        return [TilePlan(grid, settings.overview) for _ in sizes]
    return [
        TilePlan(
            select_grid(w, h, settings.tile_size, settings.min_tiles, settings.max_tiles),
            settings.overview,
        )
        for w, h in sizes
    ]


def tile_image(
    image: torch.Tensor, plan: TilePlan, tile_size: int, fill: Sequence[float]
) -> List[torch.Tensor]:
    """A ``[3, H, W]`` image in [0, 1] as ``[3, T, T]`` tiles in ``plan.order()``.

    The sub-images come from the image resized by ``resize_scale`` (aspect kept) and
    centred on the grid's canvas, whose rest is ``fill`` (the encoder's mean colour, so 0
    after normalisation); the overview is the whole image resized to ``T x T``.
    Resizing is bilinear with antialiasing.
    """
    overview = _resize(image, tile_size, tile_size)
    if plan.grid is None:
        return [overview]
    grid, (height, width) = plan.grid, image.shape[1:]
    scale = resize_scale(width, height, grid, tile_size)
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    canvas_width, canvas_height = grid.cols * tile_size, grid.rows * tile_size
    canvas = (
        torch.tensor(fill, dtype=image.dtype).view(3, 1, 1).repeat(1, canvas_height, canvas_width)
    )
    left, top = (canvas_width - new_width + 1) // 2, (canvas_height - new_height + 1) // 2
    canvas[:, top : top + new_height, left : left + new_width] = _resize(
        image, new_height, new_width
    )
    tiles = [
        canvas[:, r * tile_size : (r + 1) * tile_size, c * tile_size : (c + 1) * tile_size]
        for r in range(grid.rows)
        for c in range(grid.cols)
    ]
    if plan.overview == "before":
        return [overview, *tiles]
    if plan.overview == "after":
        return [*tiles, overview]
    return tiles


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    if tuple(image.shape[1:]) == (height, width):
        return image
    resized = F.interpolate(
        image[None].float(),
        size=(height, width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return resized[0].clamp(0, 1).to(image.dtype)


def tile_sample(
    sample: Sample,
    settings: TilingConfig,
    *,
    image_token_id: int,
    fill: Sequence[float],
    separator_id: Optional[int] = None,
) -> Sample:
    """``sample`` with every image replaced by its tiles, each with its own placeholder
    (never a loss target), ``separator_id`` between the tiles of one image when given; a
    sample with ``max_images_to_split`` images or more, or with tiling off, keeps one tile
    per image (the image at ``tile_size``)."""
    sizes = [image_height_width(image)[::-1] for image in sample.images]
    plans = plan_tiles(sizes, settings)
    images: List[Image] = []
    for image, plan in zip(sample.images, plans):
        if isinstance(image, ImageShape):  # planning: the tiles' sizes only
            images += [ImageShape(settings.tile_size, settings.tile_size)] * plan.num_tiles
        else:
            images += tile_image(image, plan, settings.tile_size, fill)
    token_ids, trainable = repeat_placeholders(
        sample.token_ids,
        sample.trainable,
        [plan.num_tiles for plan in plans],
        image_token_id=image_token_id,
        separator_id=separator_id,
    )
    return Sample(sample.source, token_ids, images, trainable=trainable)


def repeat_placeholders(
    token_ids: Sequence[int],
    trainable: Optional[Sequence[bool]],
    tile_counts: Sequence[int],
    *,
    image_token_id: int,
    separator_id: Optional[int] = None,
) -> Tuple[List[int], Optional[List[bool]]]:
    """One placeholder per image -> ``tile_counts[i]`` placeholders for image ``i``,
    adjacent or with ``separator_id`` between them (neither is ever a loss target);
    ``trainable`` (or None) follows the ids."""
    counts = iter(tile_counts)
    flags = trainable if trainable is not None else [True] * len(token_ids)
    ids: List[int] = []
    expanded: Optional[List[bool]] = [] if trainable is not None else None
    for token, flag in zip(token_ids, flags):
        if token != image_token_id:
            ids.append(token)
            if expanded is not None:
                expanded.append(flag)
            continue
        group = tile_group(next(counts), image_token_id, separator_id)
        ids += group
        if expanded is not None:
            expanded += [False] * len(group)
    return ids, expanded


def separator_token(settings: TilingConfig, tokenizer) -> Optional[int]:
    """The id of ``data.tiling.separator`` (None when unset or tiling is off)."""
    if settings.mode == "none" or not settings.separator:
        return None
    from mm1_megatron.data.shards.conversations import template_token

    try:
        return template_token(tokenizer, settings.separator)
    except ValueError as exc:
        raise ValueError(
            f"data.tiling.separator={settings.separator!r} must be a single token of the "
            f"tokenizer: {exc}"
        ) from exc


def tile_group(num_tiles: int, image_token_id: int, separator_id: Optional[int]) -> List[int]:
    """The ids of one image's tiles: placeholders, with separators between them if any."""
    if separator_id is None:
        return [image_token_id] * num_tiles
    return [image_token_id] + [separator_id, image_token_id] * (num_tiles - 1)


def end_at_whole_image(
    prefix: Sequence[int], full: Sequence[int], tile_counts: Sequence[int], image_token_id: int
) -> Tuple[List[int], int]:
    """``prefix`` of the tiled ids ``full`` shortened so that it neither ends inside an
    image's tiles (separators included) nor with an image (a cut right after an image
    keeps nothing of it, as ``packing.cut_interleaved`` does); and its number of tiles."""
    starts, ends = [], []  # each image's first and one-past-last position in ``full``
    position = 0
    for count in tile_counts:
        while full[position] != image_token_id:
            position += 1
        start, seen = position, 0
        while seen < count:
            seen += int(full[position] == image_token_id)
            position += 1
        starts.append(start)
        ends.append(position)
    length = len(prefix)
    for start, end in reversed(list(zip(starts, ends))):
        if start < length <= end:  # inside the image, or right after it
            length = start
    kept = sum(count for count, end in zip(tile_counts, ends) if end <= length)
    return list(prefix[:length]), kept
