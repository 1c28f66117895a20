"""Encoded image bytes -> normalised ``[3, S, S]`` tensors, with NVIDIA DALI or PIL.

Resize modes (``S`` = ``image_size``; every mode ends in an ``S x S`` image):

- ``squash``: the whole image resized to ``S x S`` (aspect ratio not kept).
- ``crop``: the centred square of side ``min(w, h)`` resized to ``S x S`` (the same as
  resizing the shorter side to ``S`` and centre-cropping, but without rounding the
  intermediate size).
- ``pad``: the image resized to ``round(w S / L) x round(h S / L)`` (``L = max(w, h)``,
  each side at least 1) and placed at offset ``((S - w') + 1) // 2``, ``((S - h') + 1) //
  2`` on a canvas of the encoder's mean colour (0 after normalisation).

Both decoders first read the header (``image_modes``: the pixel limit and the pixel
modes, the same on both paths, before anything is decoded), then resize with a linear
filter with antialiasing, round to 8-bit pixels, apply EXIF orientation, drop alpha, then
normalise as ``(x / 255 - mean) / std`` and return ``float32`` or ``bfloat16`` CHW
tensors. The DALI path decodes with nvJPEG (``mixed``) on a GPU and with DALI's CPU
operators elsewhere, and hands to PIL the files DALI cannot read (GIF; see
``image_modes``) or fails on; on the same files the two decoders agree to a few 8-bit
steps (``tests/data/test_images.py`` and ``test_image_modes.py`` state the tolerance).

A blob that cannot be decoded comes back as a ``BadSample`` instead of a tensor, so one
bad image never fails a batch.

**Native resolution** (``model.vision.native_resolution``, PIL only): the resize mode
gives way to SigLIP 2's size rule (``native_resolution.py``): each image is resized with
the same bilinear filter to its own multiple-of-patch size under ``max_patches`` and
comes back as ``[3, h, w]``, to be packed into patches with its sequence's other images.

**Tiles** (``data.tiling``, PIL only): ``decode_tiles`` decodes each image at its own
size (EXIF orientation applied, 8-bit RGB), cuts it into the tiles of its plan with
``tiling.tile_image`` (as the synthetic pipeline does; the exported processor carries its
own copy, tested equal) and normalises each tile. ``image_size_of`` reads an image's
oriented size from its header alone, so a plan (and the sample's token count) is known
before packing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch

from mm1_megatron.config import schema
from mm1_megatron.data.pipeline.native_resolution import NativeResolution
from mm1_megatron.data.pipeline.tiling import TilePlan, tile_image
from mm1_megatron.data.shards.image_modes import (
    corrupt,
    decode_rgb,
    open_checked,
    pil_only,
    read_header,
)
from mm1_megatron.data.shards.skips import BadSample

logger = logging.getLogger(__name__)

# The choices are declared once, in the config schema.
RESIZE_MODES = schema.IMAGE_RESIZE_MODES
IMAGE_DECODERS = schema.IMAGE_DECODERS
IMAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
assert tuple(IMAGE_DTYPES) == schema.IMAGE_DTYPES
DALI_MAX_BATCH = 64
NATIVE_RESOLUTION_NEEDS_PIL = (
    "model.vision.native_resolution=true resizes each image to its own size (SigLIP 2's "
    "rule), which the DALI pipeline (one output size per batch) does not do: set "
    "data.images.decoder=pil"
)

Decoded = Union[torch.Tensor, BadSample]
DecodedTiles = Union[List[torch.Tensor], BadSample]
EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_size_of(blob: bytes) -> Tuple[int, int]:
    """``(width, height)`` as displayed (EXIF orientation applied), from the header
    only; ``BadSample`` for data Pillow cannot identify or refused by
    ``image_modes.check_header`` (a decompression bomb, an unsupported pixel mode)."""
    with open_checked(blob) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION)
        except Exception as exc:  # Pillow raises many types for bad data
            raise corrupt(exc) from exc
    return (height, width) if orientation in TRANSPOSED_ORIENTATIONS else (width, height)


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def check_image_options(decoder: str, resize_mode: str, dtype: str) -> None:
    if decoder not in IMAGE_DECODERS:
        raise ValueError(f"image decoder {decoder!r} is not one of {IMAGE_DECODERS}")
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {resize_mode!r} is not one of {RESIZE_MODES}")
    if dtype not in IMAGE_DTYPES:
        raise ValueError(f"image dtype {dtype!r} is not one of {list(IMAGE_DTYPES)}")
    if decoder == "dali" and not dali_installed():
        raise ValueError(
            "data.images.decoder=dali but NVIDIA DALI is not installed: "
            "`pip install -e .[dali]` (nvidia-dali-cuda120), or set "
            "data.images.decoder=pil"
        )


def pad_geometry(width: int, height: int, size: int) -> Tuple[int, int, int, int]:
    """``pad`` mode: resized width and height, then the x and y offset on the canvas."""
    longest = max(width, height)
    new_width = max(1, int(np.floor(width * size / longest + 0.5)))
    new_height = max(1, int(np.floor(height * size / longest + 0.5)))
    return new_width, new_height, (size - new_width + 1) // 2, (size - new_height + 1) // 2


class ImageDecoder:
    """Shared settings and the final normalisation; subclasses implement ``_decode``."""

    def __init__(
        self,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        resize_mode: str = "crop",
        dtype: str = "fp32",
        native: Optional[NativeResolution] = None,
    ):
        check_image_options(self.name, resize_mode, dtype)
        self.image_size = image_size
        self.mean = [float(m) for m in mean]
        self.std = [float(s) for s in std]
        self.resize_mode = resize_mode
        self.dtype = IMAGE_DTYPES[dtype]
        self.native = native

    name = ""

    def decode(self, blobs: Sequence[bytes]) -> List[Decoded]:
        """One tensor ``[3, S, S]`` (or a ``BadSample``) per blob, in order; with
        ``native``, ``[3, h, w]`` at each image's own size."""
        results: List[Optional[Decoded]] = [None] * len(blobs)
        todo = []
        for i, blob in enumerate(blobs):
            if len(blob) == 0:
                results[i] = BadSample("empty_file", "zero-byte image")
            else:
                todo.append(i)
        for i, decoded in zip(todo, self._decode([blobs[i] for i in todo])):
            results[i] = decoded.to(self.dtype) if isinstance(decoded, torch.Tensor) else decoded
        return results

    def _decode(self, blobs: List[bytes]) -> List[Decoded]:
        raise NotImplementedError

    def decode_tiles(self, blobs: Sequence[bytes], plans: Sequence[TilePlan]) -> List[DecodedTiles]:
        """The normalised ``[3, S, S]`` tiles of each blob in its plan's order (``S`` =
        ``image_size``, the tile size), or a ``BadSample``."""
        raise ValueError(f"the {self.name} image decoder does not cut tiles; use pil")

    def empty(self) -> torch.Tensor:
        """The images of a sequence without any: ``[0, 3, S, S]``, or with ``native`` no
        patches ``[0, 3 * p * p]``."""
        if self.native is not None:
            return self.native.empty(self.dtype)[0]
        return torch.zeros((0, 3, self.image_size, self.image_size), dtype=self.dtype)


class PILImageDecoder(ImageDecoder):
    """Pillow, one image at a time on the calling thread."""

    name = "pil"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def _decode(self, blobs: List[bytes]) -> List[Decoded]:
        return [self.decode_one(blob) for blob in blobs]

    def decode_tiles(self, blobs: Sequence[bytes], plans: Sequence[TilePlan]) -> List[DecodedTiles]:
        results: List[DecodedTiles] = []
        for blob, plan in zip(blobs, plans):
            try:
                pixels = np.array(decode_rgb(blob))
            except BadSample as bad:
                results.append(bad)
                continue
            image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
            tiles = tile_image(image, plan, self.image_size, self.mean)
            results.append([((t - self._mean) / self._std).to(self.dtype) for t in tiles])
        return results

    def decode_one(self, blob: bytes) -> Decoded:
        """One ``float32 [3, S, S]`` tensor or a ``BadSample`` (``decode`` casts)."""
        try:
            pixels, offset = self._resize(decode_rgb(blob))
        except BadSample as bad:
            return bad
        except Exception as exc:  # Pillow raises many types for bad data
            return corrupt(exc)
        chw = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0 - self._mean) / self._std
        if offset is None:
            return chw
        left, top = offset
        canvas = torch.zeros((3, self.image_size, self.image_size))  # the mean colour
        canvas[:, top : top + chw.shape[1], left : left + chw.shape[2]] = chw
        return canvas

    def _resize(self, image) -> Tuple[np.ndarray, Optional[Tuple[int, int]]]:
        """``[h, w, 3]`` uint8 pixels and, in ``pad`` mode, their (x, y) canvas offset."""
        from PIL import Image

        size, (width, height) = self.image_size, image.size
        if self.native is not None:
            new_height, new_width = self.native.image_size(height, width)
            return np.array(image.resize((new_width, new_height), Image.BILINEAR)), None
        if self.resize_mode == "squash":
            return np.array(image.resize((size, size), Image.BILINEAR)), None
        if self.resize_mode == "crop":
            side = min(width, height)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
            return np.array(image.resize((size, size), Image.BILINEAR, box=box)), None
        new_width, new_height, left, top = pad_geometry(width, height, size)
        resized = np.array(image.resize((new_width, new_height), Image.BILINEAR))
        return resized, (left, top)


class DALIImageDecoder(ImageDecoder):
    """NVIDIA DALI: ``mixed`` (nvJPEG) decoding on a GPU, CPU operators otherwise.

    Every header is read first (``image_modes``): bombs and unsupported modes are refused
    as on the PIL path, and files DALI cannot read (GIF) are decoded with PIL. The
    pipeline is built on first use in each process (DALI pipelines do not survive a
    fork). A failed batch invalidates a DALI pipeline, so it is rebuilt and the batch's
    images are decoded one by one; an image DALI fails on goes to PIL, so this path
    refuses nothing the PIL path decodes. A pipeline that cannot be built is a setup
    error, not bad data: it raises instead of turning every image into a skip.
    """

    name = "dali"

    def __init__(self, *, num_threads: int = 1, device_id: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if self.native is not None:
            raise ValueError(NATIVE_RESOLUTION_NEEDS_PIL)
        self.num_threads = num_threads
        self.device_id = device_id
        self._pipeline = None
        self._pid = -1
        self._pil = PILImageDecoder(**kwargs)
        self._logged_fallbacks: Set[str] = set()

    def _decode(self, blobs: List[bytes]) -> List[Decoded]:
        results: List[Optional[Decoded]] = [None] * len(blobs)
        for_dali = []
        for i, blob in enumerate(blobs):
            try:
                header = read_header(blob)
            except BadSample as bad:
                results[i] = bad
                continue
            if pil_only(header):
                self._log_fallback(logging.INFO, f"{header.format} {header.mode} images")
                results[i] = self._pil.decode_one(blob)
            else:
                for_dali.append(i)
        for start in range(0, len(for_dali), DALI_MAX_BATCH):
            chunk = for_dali[start : start + DALI_MAX_BATCH]
            self._get_pipeline()  # outside the try: a build failure is not a bad image
            try:
                decoded = self._run([blobs[i] for i in chunk])
            except RuntimeError:
                self._pipeline = None
                decoded = [self._decode_alone(blobs[i]) for i in chunk]
            for i, image in zip(chunk, decoded):
                results[i] = image
        return results

    def _decode_alone(self, blob: bytes) -> Decoded:
        self._get_pipeline()
        try:
            return self._run([blob])[0]
        except RuntimeError as exc:
            self._pipeline = None
            decoded = self._pil.decode_one(blob)
            if isinstance(decoded, torch.Tensor):
                lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                detail = " ".join(lines[:2])[:200]
                self._log_fallback(logging.WARNING, "images DALI fails on", detail)
            return decoded

    def _log_fallback(self, level: int, what: str, dali_error: str = "") -> None:
        """Logged once per kind of file and decoder."""
        if what not in self._logged_fallbacks:
            self._logged_fallbacks.add(what)
            said = f" (first failure: {dali_error})" if dali_error else ""
            logger.log(level, "DALI image decoder: %s are decoded with PIL%s", what, said)

    def _run(self, blobs: List[bytes]) -> List[torch.Tensor]:
        pipeline = self._get_pipeline()
        pipeline.feed_input("encoded", [np.frombuffer(blob, dtype=np.uint8) for blob in blobs])
        (output,) = pipeline.run()
        if self.device_id is not None:
            output = output.as_cpu()
        batch = np.array(output.as_tensor())  # a copy: DALI reuses its buffers
        return list(torch.from_numpy(batch).unbind(0))

    def _get_pipeline(self):
        if self._pipeline is None or self._pid != os.getpid():
            try:
                self._pipeline = self._build_pipeline()
            except RuntimeError as exc:
                raise RuntimeError(
                    f"the DALI image pipeline ({'GPU' if self.device_id is not None else 'CPU'}"
                    f", resize {self.resize_mode}) cannot be built: {exc}; set "
                    "data.images.decoder=pil to decode with PIL instead"
                ) from exc
            self._pid = os.getpid()
        return self._pipeline

    def _build_pipeline(self):
        built = define_dali_pipeline(
            image_size=self.image_size,
            mean=self.mean,
            std=self.std,
            resize_mode=self.resize_mode,
            device_id=self.device_id,
            num_threads=self.num_threads,
        )
        built.build()
        return built


def define_dali_pipeline(
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str,
    device_id: Optional[int],
    num_threads: int = 1,
):
    """The DALI pipeline (defined, not built: definition needs no GPU).

    ``device_id`` None decodes on the CPU, otherwise nvJPEG ("mixed") on that GPU. The
    geometry of ``crop`` and ``pad`` comes from the encoded bytes on the CPU
    (``peek_image_shape``), never from the decoded GPU image: taking a GPU node's shape
    back to the CPU needs DALI's dynamic executor, which this synchronous pipeline is not.
    """
    from nvidia.dali import fn, pipeline_def, types

    mean = [m * 255.0 for m in mean]
    std = [s * 255.0 for s in std]
    decoder_device = "cpu" if device_id is None else "mixed"

    @pipeline_def(
        batch_size=DALI_MAX_BATCH,
        num_threads=num_threads,
        device_id=device_id,
        exec_async=False,
        exec_pipelined=False,
        prefetch_queue_depth=1,
    )
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        image = fn.decoders.image(
            encoded, device=decoder_device, output_type=types.RGB, adjust_orientation=True
        )
        shape = fn.peek_image_shape(encoded, adjust_orientation=True)  # HWC, on the CPU
        image, crop = _dali_resize(fn, types, image, shape, image_size, resize_mode)
        return fn.crop_mirror_normalize(
            image, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std, **crop
        )

    return pipeline()


def _dali_resize(fn, types, image, encoded_shape, size: int, mode: str):
    """The DALI graph of one resize mode (see the module docstring for the geometry)."""
    import nvidia.dali.math as dmath

    linear = {"interp_type": types.INTERP_LINEAR, "antialias": True}
    if mode == "squash":
        return fn.resize(image, size=(size, size), **linear), {}
    shape = fn.cast(encoded_shape, dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    if mode == "crop":
        side = dmath.min(height, width)
        top, left = (height - side) * 0.5, (width - side) * 0.5
        resized = fn.resize(
            image,
            size=(size, size),
            roi_start=fn.stack(top, left),
            roi_end=fn.stack(top + side, left + side),
            **linear,
        )
        return resized, {}
    longest = dmath.max(height, width)
    new_height = dmath.max(dmath.floor(height * size / longest + 0.5), 1.0)
    new_width = dmath.max(dmath.floor(width * size / longest + 0.5), 1.0)
    resized = fn.resize(image, size=fn.stack(new_height, new_width), **linear)
    # A centred crop window larger than the image pads it; fill values are post-normalisation.
    return resized, {
        "crop": (size, size),
        "out_of_bounds_policy": "pad",
        "fill_values": [0.0, 0.0, 0.0],
    }


def build_image_decoder(
    decoder: str,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "crop",
    dtype: str = "fp32",
    dali_threads: int = 2,
    native: Optional[NativeResolution] = None,
) -> ImageDecoder:
    """``pil`` or ``dali`` (GPU decoding when CUDA is available, else DALI's CPU operators;
    ``dali_threads`` CPU threads per pipeline). ``native``: SigLIP 2's sizes (PIL only)."""
    if decoder == "dali" and native is not None:
        raise ValueError(NATIVE_RESOLUTION_NEEDS_PIL)
    check_image_options(decoder, resize_mode, dtype)
    kwargs = dict(
        image_size=image_size,
        mean=mean,
        std=std,
        resize_mode=resize_mode,
        dtype=dtype,
        native=native,
    )
    if decoder == "pil":
        return PILImageDecoder(**kwargs)
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    return DALIImageDecoder(device_id=device_id, num_threads=dali_threads, **kwargs)
