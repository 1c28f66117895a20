"""Synthetic image-text samples whose text is predictable from their images.

An image is a plain background (black, white or gray) with 1-3 flat-coloured shapes
(circle, square, triangle), each inside its own cell of a 3x3 grid ("top left", ...,
"center", ..., "bottom right"), slightly jittered in size and position. Three sources:

- ``caption``: ``<bos> <image> there are two shapes on a gray background : a red circle
  at the top left and a blue square at the center . <eos>``.
- ``interleaved``: 2-4 images, each introduced before and described after its
  placeholder, described before it, or followed by its caption (as in a photo album),
  ending with the total shape count over all images (so text depends on every image).
  Runs of captioned pictures are what few-shot captioning prompts look like.
- ``text``: 1-4 templated sentences (counting, weekdays, small sums, colour facts).

Images are squares, or with ``image_sizes`` (native resolution: one ``(height, width)``
per aspect ratio of ``ASPECT_RATIOS``) each image draws one of those sizes; the 3x3 grid
then stretches with the image while shapes keep their proportions (sized by the shorter
side of a cell).

All randomness comes from the ``numpy.random.Generator`` passed in, so a sample is a pure
function of the generator's state. What it cannot do: shapes never overlap or touch the
image border, colours are exact (no noise, lighting or anti-aliasing), and below about
24 px a shape is only a few pixels (each covers at least its centre pixel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mm1_megatron.data.pipeline.packing import Image, ImageShape, Sample
from mm1_megatron.data.tokenizers import base as vocab
from mm1_megatron.data.tokenizers.base import Tokenizer

SOURCES = ("caption", "interleaved", "text")
MIN_IMAGE_SIZE = 12
# Width:height of the images at native resolution: square, landscape, portrait, and two
# strips, so a batch mixes grids of several shapes.
ASPECT_RATIOS: Tuple[Tuple[int, int], ...] = ((1, 1), (2, 1), (1, 2), (4, 1), (1, 4))

COLOUR_RGB: Dict[str, Tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "purple": (0.6, 0.0, 0.8),
    "orange": (1.0, 0.55, 0.0),
    "cyan": (0.0, 1.0, 1.0),
}
BACKGROUND_RGB: Dict[str, Tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "gray": (0.5, 0.5, 0.5),
}
# Cell index (row-major over the 3x3 grid) -> the words naming it.
CELL_NAMES: Tuple[Tuple[str, ...], ...] = (
    ("top", "left"),
    ("top", "center"),
    ("top", "right"),
    ("middle", "left"),
    ("center",),
    ("middle", "right"),
    ("bottom", "left"),
    ("bottom", "center"),
    ("bottom", "right"),
)
assert tuple(COLOUR_RGB) == vocab.SHAPE_COLOUR_WORDS
assert tuple(BACKGROUND_RGB) == vocab.BACKGROUND_WORDS

ImageSlot = None  # marks an image placeholder in a list of words


@dataclass(frozen=True)
class ShapeSpec:
    """One shape; offsets and radius are in units of a grid cell's side."""

    colour: str
    shape: str
    cell: int
    offset_x: float = 0.0
    offset_y: float = 0.0
    radius: float = 0.33


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: Tuple[ShapeSpec, ...]  # sorted by cell: the order captions mention them


def random_scene(rng: np.random.Generator, max_shapes: int = 3) -> Scene:
    """1..``max_shapes`` shapes in distinct grid cells on a random background."""
    num_shapes = int(rng.integers(1, max_shapes + 1))
    cells = sorted(int(c) for c in rng.choice(len(CELL_NAMES), num_shapes, replace=False))
    shapes = tuple(
        ShapeSpec(
            colour=vocab.SHAPE_COLOUR_WORDS[rng.integers(len(vocab.SHAPE_COLOUR_WORDS))],
            shape=vocab.SHAPE_WORDS[rng.integers(len(vocab.SHAPE_WORDS))],
            cell=cell,
            offset_x=float(rng.uniform(-0.1, 0.1)),
            offset_y=float(rng.uniform(-0.1, 0.1)),
            radius=float(rng.uniform(0.28, 0.38)),
        )
        for cell in cells
    )
    background = vocab.BACKGROUND_WORDS[rng.integers(len(vocab.BACKGROUND_WORDS))]
    return Scene(background=background, shapes=shapes)


ImageSize = Union[int, Tuple[int, int]]  # a square's side, or (height, width)


def _height_width(size: ImageSize) -> Tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def shape_mask(spec: ShapeSpec, image_size: ImageSize) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the shape; always contains the pixel at its centre.

    Coordinates are in cells along each axis; distances are stretched to units of the
    shorter cell side (``sx``, ``sy``: both exactly 1 for a square image)."""
    height, width = _height_width(image_size)
    xs = ((np.arange(width, dtype=np.float32) + 0.5) * 3.0 / width)[None, :]
    ys = ((np.arange(height, dtype=np.float32) + 0.5) * 3.0 / height)[:, None]
    sx, sy = width / min(height, width), height / min(height, width)
    row, col = divmod(spec.cell, 3)
    cx, cy, r = col + 0.5 + spec.offset_x, row + 0.5 + spec.offset_y, spec.radius
    if spec.shape == "circle":
        mask = ((xs - cx) * sx) ** 2 + ((ys - cy) * sy) ** 2 <= r**2
    elif spec.shape == "square":
        half = 0.85 * r
        mask = (np.abs(xs - cx) * sx <= half) & (np.abs(ys - cy) * sy <= half)
    elif spec.shape == "triangle":  # apex up, base 2r wide, height 2r
        depth = (ys - (cy - r / sy)) * sy
        mask = (depth >= 0) & (depth <= 2 * r) & (np.abs(xs - cx) * sx <= depth / 2)
    else:
        raise ValueError(f"unknown shape {spec.shape!r}; expected one of {vocab.SHAPE_WORDS}")
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask[int(cy * height / 3), int(cx * width / 3)] = True
    return mask


def draw_scene(scene: Scene, image_size: ImageSize) -> torch.Tensor:
    """Render ``scene`` as a ``[3, H, W]`` float32 tensor in [0, 1] (``image_size``: the
    side of a square, or ``(H, W)``)."""
    height, width = _height_width(image_size)
    if min(height, width) < MIN_IMAGE_SIZE:
        raise ValueError(
            f"an image of {height}x{width} px is too small; the 3x3 grid of shapes "
            f"needs at least {MIN_IMAGE_SIZE} px a side"
        )
    image = np.empty((height, width, 3), dtype=np.float32)
    image[:] = BACKGROUND_RGB[scene.background]
    for spec in scene.shapes:
        image[shape_mask(spec, image_size)] = COLOUR_RGB[spec.colour]
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def describe_shapes(scene: Scene) -> List[str]:
    """E.g. ``a red circle at the top left , a blue square ... and an orange triangle``."""
    phrases = []
    for spec in scene.shapes:
        article = "an" if spec.colour[0] in "aeiou" else "a"
        phrases.append([article, spec.colour, spec.shape, "at", "the", *CELL_NAMES[spec.cell]])
    words: List[str] = []
    for i, phrase in enumerate(phrases):
        if i > 0:
            words.append("and" if i == len(phrases) - 1 else ",")
        words.extend(phrase)
    return words


def count_words(count: int, noun: str = "shape") -> List[str]:
    """``there is one shape`` / ``there are three shapes``."""
    if count == 1:
        return ["there", "is", "one", noun]
    return ["there", "are", vocab.NUMBER_WORDS[count - 1], noun + "s"]


def caption_words(scene: Scene) -> List[str]:
    return [
        *count_words(len(scene.shapes)),
        "on",
        "a",
        scene.background,
        "background",
        ":",
        *describe_shapes(scene),
        ".",
    ]


class SyntheticGenerator:
    """Draws ``Sample``s of the three sources; see the module docstring for the formats."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_size: int,
        *,
        max_shapes: int = 3,
        min_interleaved_images: int = 2,
        max_interleaved_images: int = 4,
        image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
        render: bool = True,
    ):
        """``image_sizes``: ``(height, width)`` choices, one drawn per image (native
        resolution); None: every image is an ``image_size`` square. ``render=False`` gives
        each image's ``ImageShape`` instead of its pixels (planning costs); the random
        draws, and so every sample's text, stay the same."""
        if not 1 <= max_shapes <= len(CELL_NAMES):
            raise ValueError(f"max_shapes={max_shapes} must be in [1, {len(CELL_NAMES)}]")
        if not 1 <= min_interleaved_images <= max_interleaved_images <= len(vocab.ORDINAL_WORDS):
            raise ValueError(
                f"need 1 <= min_interleaved_images <= max_interleaved_images <= "
                f"{len(vocab.ORDINAL_WORDS)}, got {min_interleaved_images} "
                f"and {max_interleaved_images}"
            )
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size={image_size} must be >= {MIN_IMAGE_SIZE}")
        if image_sizes is not None and min(min(size) for size in image_sizes) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"synthetic images of {list(image_sizes)} (height, width) px are too small: "
                f"each side needs {MIN_IMAGE_SIZE} px; raise model.vision.max_patches"
            )
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_sizes = list(image_sizes) if image_sizes is not None else None
        self.max_shapes = max_shapes
        self.min_interleaved_images = min_interleaved_images
        self.max_interleaved_images = max_interleaved_images
        self.render = render

    def sample(self, source: str, rng: np.random.Generator) -> Sample:
        if source == "caption":
            return self.caption(rng)
        if source == "interleaved":
            return self.interleaved(rng)
        if source == "text":
            return self.text(rng)
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")

    def stream(self, source: str, rng: np.random.Generator) -> Iterator[Sample]:
        """Endless samples of one source, all drawn from ``rng``."""
        while True:
            yield self.sample(source, rng)

    def draw(self, scene: Scene, rng: np.random.Generator) -> Image:
        """The scene's image: square, or at a size drawn from ``image_sizes``."""
        if self.image_sizes is None:
            size = (self.image_size, self.image_size)
        else:
            size = self.image_sizes[int(rng.integers(len(self.image_sizes)))]
        return draw_scene(scene, size) if self.render else ImageShape(*size)

    def draw_frames(self, scenes: Sequence[Scene], rng: np.random.Generator) -> List[Image]:
        """A video's frames: every scene at one size (one draw of ``image_sizes``)."""
        size = (self.image_size, self.image_size)
        if self.image_sizes is not None:
            size = self.image_sizes[int(rng.integers(len(self.image_sizes)))]
        if not self.render:
            return [ImageShape(*size) for _ in scenes]
        return [draw_scene(scene, size) for scene in scenes]

    def caption(self, rng: np.random.Generator) -> Sample:
        scene = random_scene(rng, self.max_shapes)
        image = self.draw(scene, rng)
        return self.build_sample("caption", [ImageSlot, *caption_words(scene)], [image])

    def captioned(self, words: Sequence[str], image: Image, source: str) -> Sample:
        """``<bos> <image> words <eos>`` as a sample of ``source``."""
        return self.build_sample(source, [ImageSlot, *words], [image])

    def interleaved(self, rng: np.random.Generator) -> Sample:
        num_images = int(rng.integers(self.min_interleaved_images, self.max_interleaved_images + 1))
        scenes = [random_scene(rng, self.max_shapes) for _ in range(num_images)]
        words: List[Optional[str]] = []
        for i, scene in enumerate(scenes):
            layout = rng.random()
            if layout < 1 / 3:  # introduce, then describe after the image
                intro = ["here", "is", "a"] if i == 0 else ["next", ",", "another"]
                words += [
                    *intro,
                    "picture",
                    ":",
                    ImageSlot,
                    "it",
                    "shows",
                    *describe_shapes(scene),
                    ".",
                ]
            elif layout < 2 / 3:  # describe first, the image follows
                words += [
                    "the",
                    vocab.ORDINAL_WORDS[i],
                    "picture",
                    "shows",
                    *describe_shapes(scene),
                    ":",
                    ImageSlot,
                ]
            else:  # a captioned picture, as in a photo album
                if words and words[-1] is ImageSlot:  # keep images apart: "... : <image>"
                    words += ["next", ","]
                words += [ImageSlot, *caption_words(scene)]
        total = sum(len(scene.shapes) for scene in scenes)
        words += ["in", "total", *count_words(total), "."]
        return self.build_sample("interleaved", words, [self.draw(scene, rng) for scene in scenes])

    def text(self, rng: np.random.Generator) -> Sample:
        words: List[str] = []
        for _ in range(int(rng.integers(1, 5))):
            words += text_sentence(rng)
        return self.build_sample("text", words, [])

    def build_sample(
        self, source: str, words: Sequence[Optional[str]], images: Sequence[torch.Tensor]
    ) -> Sample:
        tok = self.tokenizer
        encode_words = getattr(tok, "encode_words", None)  # the synthetic one's fast path

        def encode(chunk: List[str]) -> List[int]:
            if not chunk:
                return []
            return encode_words(chunk) if encode_words else tok.encode(" ".join(chunk))

        ids, chunk = [tok.bos_token_id], []
        for word in words:
            if word is ImageSlot:
                ids += encode(chunk)
                ids.append(tok.image_token_id)
                chunk = []
            else:
                chunk.append(word)
        ids += encode(chunk)
        ids.append(tok.eos_token_id)
        return Sample(source=source, token_ids=ids, images=list(images))


def text_sentence(rng: np.random.Generator) -> List[str]:
    """One templated sentence: counting, weekdays, a small sum, or a colour fact."""
    numbers, days = vocab.NUMBER_WORDS, vocab.WEEKDAY_WORDS
    kind = int(rng.integers(4))
    if kind == 0:
        length = int(rng.integers(3, 9))
        start = int(rng.integers(len(numbers) - length + 1))
        return ["let", "us", "count", ":", *numbers[start : start + length], "."]
    if kind == 1:
        length, start = int(rng.integers(3, 8)), int(rng.integers(len(days)))
        run = [days[(start + i) % len(days)] for i in range(length)]
        return ["the", "days", "of", "the", "week", ":", *run, "."]
    if kind == 2:
        a = int(rng.integers(1, len(numbers)))
        b = int(rng.integers(1, len(numbers) - a + 1))
        return [numbers[a - 1], "plus", numbers[b - 1], "is", numbers[a + b - 1], "."]
    colour = vocab.SHAPE_COLOUR_WORDS[rng.integers(len(vocab.SHAPE_COLOUR_WORDS))]
    shape = vocab.SHAPE_WORDS[rng.integers(len(vocab.SHAPE_WORDS))]
    if rng.random() < 0.5:
        return ["the", colour, shape, "is", colour, "."]
    return ["the", colour, shape, "is", "a", shape, "."]
