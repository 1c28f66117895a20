"""Every Pillow pixel mode: the PIL and DALI decoders give the same picture, equal to a
closed form computed with numpy from the encoded array, or both refuse it with the same
reason and message; bombs are refused on both paths before anything is decoded.

Images are ``S x S`` gradients (each channel a different one, so clipping and swapped
channels show), decoded in ``squash`` mode with mean 0 and std 1: the resize is the
identity and ``255 x`` the output is the decoded 8-bit picture. PIL and DALI may differ
by the documented 3 steps (docs/data.md); the closed forms are exact for lossless files.
"""

import io
import platform
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image

from mm1_megatron.data.pipeline.images import build_image_decoder, dali_installed, image_size_of
from mm1_megatron.data.shards import image_modes
from mm1_megatron.data.shards.skips import BadSample

S = 32
MAX_STEPS = 3  # PIL vs DALI, docs/data.md
DALI_PLATFORM = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")
needs_dali = pytest.mark.skipif(
    not dali_installed() and not DALI_PLATFORM,
    reason=f"NVIDIA DALI has no wheel for {platform.system()} {platform.machine()}",
)
DECODERS = ["pil", pytest.param("dali", marks=needs_dali)]

X = np.linspace(0, 1, S)[None, :].repeat(S, 0)  # 0 .. 1 left to right
Y = X.T  # 0 .. 1 top to bottom
RGB = np.stack([255 * X, 255 * Y, 255 * (1 - (X + Y) / 2)], -1).round().astype(np.uint8)
GREY = (255 * (X + 2 * Y) / 3).round().astype(np.uint8)
# 16-bit grey in raster order over the whole range: many values where rounding to 8
# bits differs from taking the high byte.
GREY16 = (np.arange(S * S, dtype=np.int64) * 64 + 37).reshape(S, S).astype(np.uint16)
PALETTE = np.stack([np.arange(256), np.arange(256) * 3 % 256, 255 - np.arange(256)], -1)
INDICES = (255 * (X + Y) / 2).round().astype(np.uint8)
BITS = ((X * 7).astype(int) + (Y * 5).astype(int)) % 2 == 1
CMYK = np.stack([200 * X, 200 * Y, 150 * (1 - X), 120 * (X + Y) / 2], -1).round().astype(np.uint8)
YCBCR = np.stack([60 + 150 * X, 98 + 60 * Y, 128 + 60 * (X - Y)], -1).round().astype(np.uint8)


def _cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    ink, black = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return ((255 - ink) * (255 - black) / 255).round()


def _ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """ITU-R BT.601, full range (JPEG's and TIFF's)."""
    y, cb, cr = np.moveaxis(ycbcr.astype(np.float64), -1, 0)
    red = y + 1.402 * (cr - 128)
    green = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    blue = y + 1.772 * (cb - 128)
    return np.stack([red, green, blue], -1).clip(0, 255).round()


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(grey, np.float64)[..., None], 3, -1)


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _palette_image(indices: np.ndarray) -> Image.Image:
    image = Image.fromarray(indices, "P")
    image.putpalette(PALETTE.astype(np.uint8).tobytes())
    return image


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG written by hand (Pillow writes neither 16-bit RGB nor streamed rows)."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\0" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _rotated_6(pixels: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return _save(Image.fromarray(pixels), "PNG", exif=exif.tobytes())


@dataclass
class Case:
    name: str
    blob: bytes
    expected: Optional[np.ndarray]  # [S, S, 3] 8-bit values, or None: refused
    tolerance: float = 0.0  # steps from the closed form (lossy files)
    refusal: str = ""  # part of the refusal message


RGB16 = RGB.astype(np.uint16) * 257 + np.arange(S, dtype=np.uint16)[None, :, None] * 4
FRAMES = [Image.fromarray(RGB), Image.fromarray(255 - RGB)]
CASES = [
    Case("1", _save(Image.fromarray(BITS), "PNG"), _grey_rgb(BITS * 255)),
    Case("1 TIFF", _save(Image.fromarray(BITS), "TIFF"), _grey_rgb(BITS * 255)),
    Case("L", _save(Image.fromarray(GREY), "PNG"), _grey_rgb(GREY)),
    Case("LA", _save(Image.fromarray(np.stack([GREY, INDICES], -1), "LA"), "PNG"), _grey_rgb(GREY)),
    Case("P", _save(_palette_image(INDICES), "PNG"), PALETTE[INDICES]),
    Case("P transparency", _save(_palette_image(INDICES), "PNG", transparency=0), PALETTE[INDICES]),
    Case("I;16", _save(Image.fromarray(GREY16), "PNG"), _grey_rgb(np.round(GREY16 / 257))),
    Case(
        "I;16B",
        _save(Image.fromarray(GREY16.astype(">u2")), "TIFF"),
        _grey_rgb(np.round(GREY16 / 257)),
    ),
    Case("I", _save(Image.fromarray(GREY16.astype(np.int32)), "TIFF"), None, refusal="mode I:"),
    Case("F", _save(Image.fromarray(X.astype(np.float32)), "TIFF"), None, refusal="mode F:"),
    Case("LAB", _save(Image.fromarray(RGB).convert("LAB"), "TIFF"), None, refusal="mode LAB:"),
    Case("RGB", _save(Image.fromarray(RGB), "PNG"), RGB),
    Case(
        "RGB 16-bit",
        _png(S, S, 16, 2, [row.astype(">u2").tobytes() for row in RGB16]),
        np.round(RGB16 / 257),
        tolerance=1,  # Pillow keeps the high byte, DALI rounds
    ),
    Case("RGBA", _save(Image.fromarray(np.dstack([RGB, INDICES]), "RGBA"), "PNG"), RGB),
    Case(
        "CMYK JPEG",
        _save(Image.fromarray(CMYK, "CMYK"), "JPEG", quality=100),
        _cmyk_to_rgb(CMYK),
        tolerance=3,  # JPEG (measured 1.4)
    ),
    Case(
        "YCbCr",
        _save(Image.fromarray(YCBCR, "YCbCr"), "TIFF"),
        _ycbcr_to_rgb(YCBCR),
        tolerance=1,  # Pillow's integer arithmetic
    ),
    Case(
        "animated GIF",
        _save(
            _palette_image(INDICES),
            "GIF",
            save_all=True,
            append_images=[_palette_image(255 - INDICES)],
        ),
        PALETTE[INDICES],
    ),
    Case(
        "animated WebP",
        _save(FRAMES[0], "WEBP", save_all=True, append_images=FRAMES[1:], lossless=True),
        RGB,
    ),
    Case("EXIF orientation 6", _rotated_6(RGB), np.rot90(RGB, k=-1)),
]
IDS = [case.name for case in CASES]
RGB_PNG = CASES[IDS.index("RGB")].blob


def _decoder(name: str):
    return build_image_decoder(
        name, image_size=S, mean=[0.0] * 3, std=[1.0] * 3, resize_mode="squash"
    )


@pytest.fixture(scope="module")
def decoded():
    """Each decoder's outputs for all cases, decoded in one batch (a DALI pipeline build
    costs about half a second)."""
    cache = {}

    def outputs(name: str):
        if name not in cache:
            cache[name] = _decoder(name).decode([case.blob for case in CASES])
        return cache[name]

    return outputs


def _pixels(out) -> torch.Tensor:
    assert isinstance(out, torch.Tensor), out
    assert out.shape == (3, S, S)
    return out.permute(1, 2, 0).double() * 255


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_each_mode_decodes_to_its_closed_form_or_is_refused(decoder, index, decoded):
    case, out = CASES[index], decoded(decoder)[index]
    if case.expected is None:
        assert isinstance(out, BadSample) and out.reason == "corrupt_image", out
        assert case.refusal in out.detail
        return
    steps = (_pixels(out) - torch.from_numpy(np.asarray(case.expected, np.float64))).abs()
    assert steps.max() <= case.tolerance + 1e-3, (case.name, steps.max())


@needs_dali
@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_pil_and_dali_agree_on_each_mode(index, decoded):
    pil, dali = decoded("pil")[index], decoded("dali")[index]
    if isinstance(pil, BadSample) or isinstance(dali, BadSample):
        assert (pil.reason, pil.detail) == (dali.reason, dali.detail)
    else:
        assert (_pixels(pil) - _pixels(dali)).abs().max() <= MAX_STEPS + 1e-3


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A valid 1-bit PNG of 30000 x 30000 black pixels: 109 KB, 900 M pixels."""
    side = 30000
    return _png(side, side, 1, 0, (bytes(side // 8) for _ in range(side)))


@pytest.mark.parametrize("decoder", DECODERS)
def test_a_decompression_bomb_is_refused_before_decoding(decoder, bomb, monkeypatch):
    decoding = _decoder(decoder)
    if decoder == "dali":
        run = decoding._run

        def run_without_bombs(blobs):
            assert bomb not in blobs, "the bomb was handed to DALI"
            return run(blobs)

        monkeypatch.setattr(decoding, "_run", run_without_bombs)
    start = time.perf_counter()
    out = decoding.decode([bomb, CASES[0].blob])
    seconds = time.perf_counter() - start
    assert isinstance(out[0], BadSample) and out[0].reason == "corrupt_image"
    assert out[0].detail == (
        f"decompression bomb: 900000000 pixels, over the limit of {image_modes.MAX_IMAGE_PIXELS}"
        " pixels (image_modes.MAX_IMAGE_PIXELS)"
    )
    assert isinstance(out[1], torch.Tensor)
    assert seconds < 5  # decoding the bomb took a minute and 5.5 GB before
    assert _decoder("pil").decode([bomb])[0].detail == out[0].detail


@pytest.mark.parametrize("decoder", DECODERS)
def test_both_paths_use_the_one_pixel_limit(decoder, monkeypatch):
    """The limit is ours, not Pillow's global: lowered, it refuses an S x S image."""
    blob = CASES[0].blob
    assert isinstance(_decoder(decoder).decode([blob])[0], torch.Tensor)
    monkeypatch.setattr(image_modes, "MAX_IMAGE_PIXELS", S * S - 1)
    (out,) = _decoder(decoder).decode([blob])
    assert isinstance(out, BadSample) and out.reason == "corrupt_image"
    assert out.detail == (
        f"decompression bomb: {S} x {S} = {S * S} pixels, over the limit of {S * S - 1} "
        "pixels (image_modes.MAX_IMAGE_PIXELS)"
    )
    with pytest.raises(BadSample, match="decompression bomb"):
        image_size_of(blob)  # the tiling plan's header read too


@needs_dali
def test_an_image_dali_fails_on_is_decoded_with_pil(monkeypatch):
    """DALI's own failures on files Pillow reads (e.g. a WebP whose odd-sized image chunk
    is followed by an EXIF chunk) go to PIL, so both paths accept the same files."""
    failing, fine = CASES[-1].blob, CASES[0].blob
    decoding = _decoder("dali")
    run = decoding._run

    def run_failing(blobs):
        if failing in blobs:
            raise RuntimeError("Critical error in pipeline: Error in CPU operator")
        return run(blobs)

    monkeypatch.setattr(decoding, "_run", run_failing)
    out = decoding.decode([fine, failing])
    reference = _decoder("pil").decode([fine, failing])
    assert (_pixels(out[1]) - _pixels(reference[1])).abs().max() == 0
    assert (_pixels(out[0]) - _pixels(reference[0])).abs().max() <= MAX_STEPS


@needs_dali
def test_files_dali_cannot_read_go_straight_to_pil(monkeypatch):
    """GIF and 1-bit TIFF never reach DALI: a failed DALI batch costs a pipeline rebuild
    and a retry of each of its images."""
    pil_files = [case.blob for case in CASES if case.name in ("animated GIF", "1 TIFF")]
    decoding = _decoder("dali")
    run = decoding._run

    def run_without_pil_files(blobs):
        assert not set(blobs) & set(pil_files), "DALI was given a file it cannot read"
        return run(blobs)

    monkeypatch.setattr(decoding, "_run", run_without_pil_files)
    assert all(isinstance(out, torch.Tensor) for out in decoding.decode(pil_files + [RGB_PNG]))


def test_the_shard_builder_refuses_what_training_would_refuse(tmp_path):
    """``build_shards(verify_images=True)`` applies the same limit: a 12000 x 12000 image
    (between Pillow's own warning and error sizes, which its default only warns about)."""
    from mm1_megatron.data.shards.writer import ImageFile, build_shards

    side = 12000
    big = tmp_path / "big.png"
    big.write_bytes(_png(side, side, 1, 0, (bytes(side // 8) for _ in range(side))))
    counts = build_shards(
        [["a caption", ImageFile(big, "big.png")]],
        tmp_path / "shards",
        kind="caption",
        samples_per_shard=1,
        input_id="test",
        verify_images=True,
        progress=False,
    )
    assert counts.get("corrupt_image") == 1 and counts.get("written", 0) == 0
