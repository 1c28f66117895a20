"""The sample schema of caption and interleaved shards, and its token form.

A sample is the tar members that share a key (see ``tar_shards``). Its order of text and
images comes from one of:

- a ``json`` member holding ``{"segments": [...]}``, each segment either
  ``{"text": "<str>"}`` or ``{"image": "<extension>"}``, where the extension names an
  image member of the same sample (``{"image": "0.jpg"}`` -> member ``<key>.0.jpg``).
  Other keys of the JSON object (``url``, ``source``, ...) are ignored;
- otherwise (no ``json``, or one without ``segments``, as img2dataset writes) the classic
  WebDataset caption pair: one image member (``jpg``, ``png``, ...) and a ``txt``
  member: the image, then the text.

Text must be UTF-8. A sample needs at least one segment. In token form a sample is
``<bos>``, each segment in order (text encoded, each image one ``<image>`` placeholder),
``<eos>``. Pad and image ids that a tokenizer produces from the text itself (e.g. a
literal ``<image>`` in a web page) are dropped so placeholders always match images.

Whatever the bytes, parsing and tokenizing a sample raise ``BadSample`` and nothing else:
``RecordFormat`` and ``encode_text`` run through ``skips.parse_untrusted``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from mm1_megatron.data.shards.skips import BadSample, parse_untrusted
from mm1_megatron.data.tokenizers.base import Tokenizer

ReadMember = Callable[[str], bytes]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
IMAGE_MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


@dataclass(frozen=True)
class ImageRef:
    extension: str  # the member holding the image, e.g. "0.jpg"


Segment = Union[str, ImageRef]


@dataclass
class TokenizedSample:
    token_ids: List[int]  # <bos> ... <eos>, one image placeholder per image
    image_members: List[str]  # extensions of the images, in order of appearance


def is_image_extension(extension: str) -> bool:
    return extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def image_extension_of(data: bytes, fallback: str = "jpg") -> str:
    """The conventional extension for encoded image bytes (by magic number)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, extension in IMAGE_MAGIC:
        if data.startswith(magic):
            return extension
    return fallback


def decode_text(data: bytes) -> str:
    if not data:
        raise BadSample("empty_file", "zero-byte text member")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSample("bad_text", f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc


def load_json(data: bytes, what: str = "json member") -> object:
    """A member's bytes as JSON; ``BadSample`` (``bad_text``) when they are not UTF-8 JSON,
    including JSON nested deeper than Python's parser follows (``RecursionError``)."""
    text = decode_text(data)
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise BadSample("bad_text", f"{what} nests deeper than the JSON parser follows") from exc
    except ValueError as exc:
        raise BadSample("bad_text", f"{what} is not valid JSON ({exc})") from exc


def parse_segments(members: Dict[str, int], read: Callable[[str], bytes]) -> List[Segment]:
    """The segments of a sample whose member sizes are ``members`` (extension -> bytes).

    ``read(extension)`` returns a member's bytes. Raises ``BadSample``.
    """
    segments = _segments_from_json(read("json")) if "json" in members else None
    if segments is None:
        segments = _caption_pair(members, read)
    for segment in segments:
        if isinstance(segment, ImageRef):
            if segment.extension not in members:
                raise BadSample(
                    "missing_image",
                    f"record names image {segment.extension!r}, members are {sorted(members)}",
                )
            if members[segment.extension] == 0:
                raise BadSample("empty_file", f"zero-byte image {segment.extension!r}")
    return segments


def _caption_pair(members: Dict[str, int], read: Callable[[str], bytes]) -> List[Segment]:
    if "txt" not in members:
        raise BadSample(
            "bad_record",
            f"neither a json record with segments nor a txt caption "
            f"among members {sorted(members)}",
        )
    images = [ext for ext in members if is_image_extension(ext)]
    if len(images) != 1:
        raise BadSample(
            "bad_record" if images else "missing_image",
            f"a txt caption needs exactly one image member, found {images}",
        )
    return [ImageRef(images[0]), decode_text(read("txt"))]


def _segments_from_json(data: bytes) -> Optional[List[Segment]]:
    record = load_json(data)
    if isinstance(record, dict) and "segments" not in record:
        return None  # metadata only (as img2dataset writes): the txt caption may follow
    raw = record.get("segments") if isinstance(record, dict) else None
    if not isinstance(raw, list) or not raw:
        raise BadSample("bad_record", "json record needs a non-empty 'segments' list")
    segments: List[Segment] = []
    for item in raw:
        if isinstance(item, dict) and set(item) == {"text"} and isinstance(item["text"], str):
            segments.append(item["text"])
        elif isinstance(item, dict) and set(item) == {"image"} and isinstance(item["image"], str):
            segments.append(ImageRef(item["image"].lower()))
        else:
            raise BadSample(
                "bad_record", f"segment {item!r} is neither {{'text': str}} nor {{'image': str}}"
            )
    return segments


def tokenize_segments(segments: Sequence[Segment], tokenizer: Tokenizer) -> TokenizedSample:
    """``<bos>`` + segments + ``<eos>``; see the module docstring."""
    dropped = {tokenizer.image_token_id, tokenizer.pad_token_id}
    ids = [tokenizer.bos_token_id]
    images: List[str] = []
    for segment in segments:
        if isinstance(segment, ImageRef):
            ids.append(tokenizer.image_token_id)
            images.append(segment.extension)
        elif segment:
            ids += [token for token in encode_text(tokenizer, segment) if token not in dropped]
    ids.append(tokenizer.eos_token_id)
    return TokenizedSample(token_ids=ids, image_members=images)


def encode_text(tokenizer: Tokenizer, text: str) -> List[int]:
    """Token ids of a sample's text; whatever the tokenizer raises on it (e.g.
    ``SyntheticTokenizer`` meeting a word it does not know) is ``bad_text``."""
    return parse_untrusted("text", tokenizer.encode, text, reason="bad_text")


def record_members(segments: Sequence[Union[str, Tuple[bytes, str]]]) -> Dict[str, bytes]:
    """Members of one sample for a shard writer: images as ``(bytes, extension)`` pairs.

    Images become ``<n>.<extension>`` members, the order a ``json`` member.
    """
    members: Dict[str, bytes] = {}
    record: List[Dict[str, str]] = []
    for segment in segments:
        if isinstance(segment, str):
            record.append({"text": segment})
        else:
            data, extension = segment
            name = f"{sum(1 for item in record if 'image' in item)}.{extension}"
            members[name] = data
            record.append({"image": name})
    members["json"] = json.dumps({"segments": record}, ensure_ascii=False).encode("utf-8")
    return members


def conversation_members(
    record: Dict[str, object], images: Sequence[Tuple[bytes, str]]
) -> Dict[str, bytes]:
    """Members of one conversation sample: ``<n>.<extension>`` images and a ``json``
    member, the LLaVA record with ``image`` naming those members in order."""
    members: Dict[str, bytes] = {}
    names = []
    for number, (data, extension) in enumerate(images):
        names.append(f"{number}.{extension}")
        members[names[-1]] = data
    stored = {key: value for key, value in record.items() if key != "image"}
    stored["image"] = names
    members["json"] = json.dumps(stored, ensure_ascii=False).encode("utf-8")
    return members


def read_conversation_record(
    members: Dict[str, int], read: Callable[[str], bytes]
) -> Dict[str, object]:
    """The ``json`` record of a conversation sample, its images checked to be members."""
    if "json" not in members:
        raise BadSample("bad_record", f"no json member among {sorted(members)}")
    record = load_json(read("json"))
    if not isinstance(record, dict):
        raise BadSample("bad_record", "the json member is not an object")
    images = record.get("image", [])
    names = [images] if isinstance(images, str) else images if isinstance(images, list) else []
    for name in names:
        if not isinstance(name, str):
            raise BadSample("bad_record", f"'image' names must be text, got {name!r}")
        if name not in members:
            raise BadSample(
                "missing_image", f"record names image {name!r}, members are {sorted(members)}"
            )
        if members[name] == 0:
            raise BadSample("empty_file", f"zero-byte image {name!r}")
    return record


class RecordFormat:
    """How the samples of a shard become segments or conversation records: our own
    format (this class); Megatron-Energon datasets bring theirs (``energon.py``).

    ``members`` maps each member's extension to its size, ``read(extension)`` returns its
    bytes; images are named by extension and read later, so nothing decodes them here.
    ``segments`` and ``conversation`` raise ``BadSample`` and nothing else, whatever the
    bytes (subclasses implement ``_segments`` and ``_conversation``).
    """

    name = "mm1_megatron"

    def segments(self, members: Dict[str, int], read: ReadMember) -> List[Segment]:
        return parse_untrusted(f"{self.name} record", self._segments, members, read)

    def conversation(self, members: Dict[str, int], read: ReadMember) -> Dict[str, object]:
        return parse_untrusted(f"{self.name} record", self._conversation, members, read)

    def _segments(self, members: Dict[str, int], read: ReadMember) -> List[Segment]:
        return parse_segments(members, read)

    def _conversation(self, members: Dict[str, int], read: ReadMember) -> Dict[str, object]:
        return read_conversation_record(members, read)


NATIVE_RECORDS = RecordFormat()
