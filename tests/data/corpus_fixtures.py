"""Small corpora on disk in the layouts `mm1 data` reads, made from synthetic scenes.

Captions and documents use only the synthetic vocabulary, so ``SyntheticTokenizer``
reads them and a caption is predictable from its image. Images vary in size and aspect
ratio and alternate between JPEG and PNG.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from mm1_megatron.data.synthetic.world import (
    caption_words,
    describe_shapes,
    draw_scene,
    random_scene,
    text_sentence,
)


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG") -> Tuple[bytes, str]:
    """A synthetic scene at a random size and aspect ratio, and its caption."""
    scene = random_scene(rng)
    side = int(rng.integers(40, 96))
    pixels = (draw_scene(scene, side).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    width = int(side * rng.uniform(0.6, 1.6))
    image = Image.fromarray(pixels).resize((width, side), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue(), " ".join(caption_words(scene))


def _save(folder: Path, name: str, data: bytes) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return name


def make_coco(root: Path, num_images: int, seed: int = 0) -> Tuple[Path, Path]:
    """``annotations.json`` with two captions per image, and ``images/``."""
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images, annotations = [], []
    for i in range(num_images):
        fmt = "JPEG" if i % 2 == 0 else "PNG"
        data, caption = image_bytes(rng, fmt)
        name = _save(images_dir, f"{i:012d}.{'jpg' if fmt == 'JPEG' else 'png'}", data)
        images.append({"id": 100 + i, "file_name": name})
        annotations.append({"id": 2 * i + 1, "image_id": 100 + i, "caption": caption})
        annotations.append({"id": 2 * i + 2, "image_id": 100 + i, "caption": caption + " ."})
    root.mkdir(parents=True, exist_ok=True)
    captions = root / "annotations.json"
    captions.write_text(json.dumps({"images": images, "annotations": annotations[::-1]}))
    return captions, images_dir


def make_llava(root: Path, num_images: int, seed: int = 1) -> Tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images_dir = root / "llava_images"
    entries = []
    for i in range(num_images):
        data, caption = image_bytes(rng)
        name = _save(images_dir / "sub", f"{i:05d}.jpg", data)
        entries.append(
            {
                "id": str(i),
                "image": f"sub/{name}",
                "conversations": [
                    {"from": "human", "value": "<image>\nrender a short caption"},
                    {"from": "gpt", "value": caption},
                ],
            }
        )
    root.mkdir(parents=True, exist_ok=True)
    path = root / "llava.json"
    path.write_text(json.dumps(entries))
    return path, images_dir


def interleaved_document(
    rng: np.random.Generator, images_dir: Path, number: int, url_map: dict
) -> dict:
    """2-4 images, each described; every second one referenced by URL."""
    segments: List[dict] = []
    num_images = int(rng.integers(2, 5))
    for i in range(num_images):
        data, _ = image_bytes(rng, "PNG" if i % 2 else "JPEG")
        name = _save(images_dir, f"doc{number}_{i}.img", data)
        scene_text = " ".join(["here", "is", "a", "picture", ":"])
        segments.append({"text": scene_text})
        if i % 2:
            url = f"https://example.invalid/{number}/{i}.png"
            url_map[url] = f"images/{name}"
            segments.append({"image": url})
        else:
            segments.append({"image": name})
        words = describe_shapes(random_scene(rng))
        segments.append({"text": " ".join(["it", "shows", *words, "."])})
    return {"segments": segments}


def make_interleaved(root: Path, num_documents: int, seed: int = 2) -> Tuple[Path, Path, Path]:
    """``docs.jsonl``, ``images/`` and ``urls.tsv`` (URL -> downloaded file)."""
    rng = np.random.default_rng(seed)
    images_dir, url_map = root / "images", {}
    lines = [
        json.dumps(interleaved_document(rng, images_dir, n, url_map)) for n in range(num_documents)
    ]
    root.mkdir(parents=True, exist_ok=True)
    jsonl = root / "docs.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    tsv = root / "urls.tsv"
    tsv.write_text("".join(f"{url}\t{path}\n" for url, path in url_map.items()))
    return jsonl, images_dir, tsv


def make_text_jsonl(root: Path, num_documents: int, seed: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(num_documents):
        words = [w for _ in range(int(rng.integers(1, 6))) for w in text_sentence(rng)]
        lines.append(json.dumps({"text": " ".join(words), "id": len(lines)}))
    root.mkdir(parents=True, exist_ok=True)
    path = root / "text.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---- shards with bad samples ------------------------------------------------------------
def write_tar(path: Path, samples: List[Tuple[str, dict]]) -> None:
    """``samples``: (key, {extension: bytes}) in order, written as ``<key>.<extension>``."""
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(name=f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def good_caption_sample(rng: np.random.Generator) -> dict:
    data, caption = image_bytes(rng)
    return {"jpg": data, "txt": caption.encode()}


def bad_caption_samples(rng: np.random.Generator) -> List[Tuple[str, dict, str]]:
    """One sample per kind of bad caption data: (key, members, expected skip reason)."""
    jpeg, caption = image_bytes(rng)
    record = lambda segments: json.dumps({"segments": segments}).encode()  # noqa: E731
    return [
        (
            "bad_corrupt",
            {
                "jpg": b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 256, 300, dtype=np.uint8)),
                "txt": caption.encode(),
            },
            "corrupt_image",
        ),
        (
            "bad_truncated_jpeg",
            {"jpg": jpeg[: len(jpeg) // 2], "txt": caption.encode()},
            "corrupt_image",
        ),
        ("bad_empty_image", {"jpg": b"", "txt": caption.encode()}, "empty_file"),
        (
            "bad_missing_image",
            {"json": record([{"image": "0.jpg"}, {"text": caption}])},
            "missing_image",
        ),
        ("bad_utf8", {"jpg": jpeg, "txt": b"there is \xff\xfe one shape"}, "bad_text"),
        ("bad_json", {"jpg": jpeg, "json": b'{"segments": [ oops'}, "bad_text"),
        ("bad_schema", {"0.jpg": jpeg, "json": record([{"picture": "0.jpg"}])}, "bad_record"),
        ("bad_too_long", {"jpg": jpeg, "txt": " ".join(["red"] * 400).encode()}, "too_long"),
    ]


def write_bad_caption_corpus(root: Path, seed: int = 5) -> Tuple[Path, Dict[str, int]]:
    """Two shards (20 samples) and a manifest; returns it and the skips of one epoch.

    Shard 0 holds 8 good samples (one whose member names try to climb out of any folder)
    and one of each bad kind. Shard 1 is cut inside its third sample's image.
    """
    from mm1_megatron.data.shards.reader import write_manifest

    rng = np.random.default_rng(seed)
    samples = [(f"good{i:03d}", good_caption_sample(rng)) for i in range(7)]
    expected: Dict[str, int] = {}
    for key, members, reason in bad_caption_samples(rng):
        samples.insert(len(samples) // 2, (key, members))
        expected[reason] = expected.get(reason, 0) + 1
    samples.append(("../../escape/evil", good_caption_sample(rng)))
    write_tar(root / "bad-000000.tar", samples)
    truncated = root / "bad-000001.tar"
    write_tar(truncated, [(f"tail{i}", good_caption_sample(rng)) for i in range(4)])
    cut_inside_third_image(truncated)
    expected["truncated_tar"] = 2  # the cut sample and the one after it
    write_manifest(
        root / "manifest.json",
        "caption",
        [
            {"path": "bad-000000.tar", "num_samples": len(samples)},
            {"path": "bad-000001.tar", "num_samples": 4},
        ],
    )
    return root / "manifest.json", expected


def cut_inside_third_image(path: Path) -> None:
    from mm1_megatron.data.shards.reader import scan_shard

    offset, size = scan_shard(path).samples[2].members["jpg"]
    with open(path, "r+b") as file:
        file.truncate(offset + size // 2)


# ---- Megatron-Energon datasets ----------------------------------------------------------
def energon_prepare(folder: Path, sample_type: str, field_map=None) -> None:
    """``energon prepare`` (its command line, as a user runs it), answering no questions."""
    import subprocess
    import sys

    command = [
        str(Path(sys.executable).with_name("energon")),
        "prepare",
        str(folder),
        "--non-interactive",
        "--split-ratio",
        "1,0,0",
        "--num-workers",
        "1",
        "--sample-type",
        sample_type,
        "--no-progress",
    ]
    if field_map is not None:
        command += ["--field-map", json.dumps(field_map)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def make_energon_captions(folder: Path, shards: int, per_shard: int, seed: int = 0) -> dict:
    """Tars of ``jpg`` + ``txt`` pairs prepared by energon as ``CaptioningSample``s;
    returns ``{key: (image bytes, caption)}``."""
    rng = np.random.default_rng(seed)
    expected = {}
    for shard in range(shards):
        samples = []
        for number in range(per_shard):
            data, caption = image_bytes(rng)
            key = f"s{shard}_{number:03d}"
            samples.append((key, {"jpg": data, "txt": caption.encode()}))
            expected[key] = (data, caption)
        write_tar(folder / f"part-{shard:02d}.tar", samples)
    energon_prepare(folder, "CaptioningSample", {"image": "jpg", "caption": "txt"})
    return expected
