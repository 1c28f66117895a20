"""Read corpus layouts people have on disk as items for ``shard_writer.build_shards``.

Each reader yields items in a fixed order (so an interrupted build resumes correctly);
an item is a list of text strings and ``ImageFile``s:

- ``coco_items``: COCO captions JSON (``images`` with ``id``/``file_name``,
  ``annotations`` with ``image_id``/``caption``) plus the image folder. One item per
  image with its first caption (lowest annotation id), or one per caption.
- ``llava_items``: LLaVA-pretrain JSON, a list of ``{"image": path, "conversations":
  [{"from": "human", ...}, {"from": "gpt", "value": caption}]}``; the caption is the
  first ``gpt`` turn.
- ``llava_conversation_items``: LLaVA instruction JSON (the same layout, ``image`` one
  path, a list of paths or absent): one conversation sample per entry, all its turns.
  Preference JSON (the same, plus ``chosen`` / ``rejected`` answers) reads the same way:
  the writer checks each record as its shard kind says (``writer.RECORD_PARSERS``).
- ``interleaved_items``: JSONL documents, either ``{"segments": [{"text": ...},
  {"image": path-or-url}, ...]}`` or OBELICS-style parallel lists ``{"texts": [str|null],
  "images": [path-or-url|null]}``. URLs are looked up in a map of already downloaded
  files (``load_url_map``); relative paths are under the image folder.
- ``jsonl_texts``: the text field of every line of JSONL files (for text corpora and
  tokenizer training); lines that are not UTF-8 JSON are skipped and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from mm1_megatron.data.shards.writer import ConversationItem, ImageFile, InputSegment

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


def _read_json(path: PathLike):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read JSON file {path}: {exc}") from exc


def coco_items(
    captions_json: PathLike, image_root: PathLike, *, all_captions: bool = False
) -> Iterator[List[InputSegment]]:
    data = _read_json(captions_json)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(
            f"{captions_json} is not a COCO captions file (needs 'images' and 'annotations')"
        )
    files = {image["id"]: image["file_name"] for image in data["images"]}
    root = Path(image_root)
    seen = set()
    for annotation in sorted(data["annotations"], key=lambda a: (a["image_id"], a["id"])):
        image_id = annotation["image_id"]
        if image_id in seen and not all_captions:
            continue
        seen.add(image_id)
        name = files.get(image_id)
        path = root / name if name else None
        yield [ImageFile(path, name or f"image id {image_id}"), annotation["caption"].strip()]


def llava_items(json_path: PathLike, image_root: PathLike) -> Iterator[List[InputSegment]]:
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path} is not a LLaVA-pretrain file (a JSON list of entries)")
    root = Path(image_root)
    for entry in data:
        caption = next(
            (
                turn.get("value", "")
                for turn in entry.get("conversations", [])
                if turn.get("from") == "gpt"
            ),
            "",
        )
        name = entry.get("image", "")
        yield [ImageFile(root / name if name else None, name), caption.strip()]


def llava_conversation_items(
    json_path: PathLike, image_root: PathLike
) -> Iterator[ConversationItem]:
    data = _read_json(json_path)
    if not isinstance(data, list):
        raise ValueError(f"{json_path} is not a LLaVA file (a JSON list of conversations)")
    root = Path(image_root)
    for entry in data:
        if not isinstance(entry, dict):
            entry = {"conversations": None}  # skipped as a bad record by the writer
        names = entry.get("image", [])
        names = [names] if isinstance(names, str) else names if isinstance(names, list) else []
        images = tuple(ImageFile(root / str(name), str(name)) for name in names)
        yield ConversationItem(dict(entry), images)


def load_url_map(path: Optional[PathLike]) -> Dict[str, Path]:
    """``url<TAB>local path`` per line (relative paths are relative to the map file)."""
    if path is None:
        return {}
    mapping = {}
    base = Path(path).parent
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        url, sep, local = line.partition("\t")
        if not sep:
            raise ValueError(f"{path}:{number}: expected 'url<TAB>path'")
        mapping[url.strip()] = base / local.strip()
    return mapping


def _image_file(reference: str, root: Path, url_map: Dict[str, Path]) -> ImageFile:
    if reference.startswith(("http://", "https://")):
        return ImageFile(url_map.get(reference), reference)
    return ImageFile(root / reference, reference)


def interleaved_items(
    jsonl_paths: Sequence[PathLike],
    image_root: PathLike,
    *,
    url_map: Optional[Dict[str, Path]] = None,
) -> Iterator[List[InputSegment]]:
    root, url_map = Path(image_root), url_map or {}
    for document in _jsonl_objects(jsonl_paths, Counter()):
        segments: List[InputSegment] = []
        if "segments" in document:
            for item in document["segments"]:
                if "image" in item:
                    segments.append(_image_file(item["image"], root, url_map))
                else:
                    segments.append(str(item.get("text", "")))
        else:
            for text, image in zip(document.get("texts", []), document.get("images", [])):
                if image:
                    segments.append(_image_file(image, root, url_map))
                elif text:
                    segments.append(str(text))
        yield segments


def jsonl_texts(
    jsonl_paths: Sequence[PathLike], text_key: str = "text", counts: Optional[Counter] = None
) -> Iterator[str]:
    counts = counts if counts is not None else Counter()
    for document in _jsonl_objects(jsonl_paths, counts):
        text = document.get(text_key)
        if isinstance(text, str):
            yield text
        elif "segments" in document:  # interleaved documents: their text only
            yield " ".join(str(s["text"]) for s in document["segments"] if "text" in s)
        else:
            counts["no_text"] += 1


def _jsonl_objects(paths: Sequence[PathLike], counts: Counter) -> Iterator[dict]:
    for path in paths:
        with open(path, "rb") as file:
            for number, raw in enumerate(file, 1):
                if not raw.strip():
                    continue
                try:
                    document = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as exc:
                    counts["bad_text"] += 1
                    logger.warning("%s:%d skipped: %s", path, number, exc)
                    continue
                if isinstance(document, dict):
                    yield document
                else:
                    counts["bad_record"] += 1
