"""Fuzzing the parsers of sample bytes: whatever a shard holds, a sample parses or is
skipped with a known reason; no other exception ever leaves a parser.

Drives, with arbitrary bytes and arbitrary JSON-like structures (deep nesting included),
the same calls the pipeline makes on a sample: our records (``RecordFormat.segments``,
``.conversation`` then ``parse_llava_record``), Megatron-Energon field maps and sample
loaders (``EnergonRecords``), and tokenization. Reproducible (``derandomize``, no example
database): 300 examples per property, about 10 s in all on 2 CPU cores.
"""

from __future__ import annotations

import json
from typing import Callable, Dict

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mm1_megatron.data.shards.conversations import (
    ChatTemplate,
    parse_llava_record,
    tokenize_conversation,
)
from mm1_megatron.data.shards.energon import DatasetSpec, EnergonRecords, ImagePart
from mm1_megatron.data.shards.preference_records import parse_preference_record, tokenize_answer
from mm1_megatron.data.shards.records import NATIVE_RECORDS, ImageRef, tokenize_segments
from mm1_megatron.data.shards.skips import SKIP_REASONS, BadSample
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

TOK = SyntheticTokenizer()
MAX_MESSAGE = 1000  # a skip's message is logged: it must stay a line, whatever the data

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies ---------------------------------------------------------------------------
IMAGE_PARTS = ["jpg", "0.jpg", "1.png", "png", "0.webp"]
WORDS = ["a", "red", "circle", ".", "<image>", "zebra", "", " ", "\x00", "<image>\n"]
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(WORDS + IMAGE_PARTS)
)
json_like = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["text", "image"]), children, max_size=4
        )
    ),
    max_leaves=16,
)
text_like = st.lists(st.sampled_from(WORDS), max_size=6).map(" ".join) | st.text(max_size=30)
segment = (
    st.fixed_dictionaries({"text": text_like | json_like})
    | st.fixed_dictionaries({"image": st.sampled_from(IMAGE_PARTS) | json_like})
    | json_like
)
segments_record = st.fixed_dictionaries(
    {"segments": st.lists(segment, max_size=5) | json_like},
    optional={"url": json_like, "image": json_like},
)
turn = st.fixed_dictionaries(
    {
        "from": st.sampled_from(["human", "gpt", "system", "user", "bot"]) | json_like,
        "value": text_like | json_like,
    }
)
llava_record = st.fixed_dictionaries(
    {"conversations": st.lists(turn | json_like, max_size=4) | json_like},
    optional={
        "image": st.sampled_from(IMAGE_PARTS) | st.lists(st.sampled_from(IMAGE_PARTS)) | json_like,
        "id": json_like,
    },
)
preference_record = st.builds(
    lambda record, chosen, rejected: {**record, "chosen": chosen, "rejected": rejected},
    llava_record,
    text_like | turn | json_like,
    text_like | turn | json_like,
)
vqa_record = st.fixed_dictionaries(
    {},
    optional={
        "question": text_like | json_like,
        "answers": st.lists(text_like, max_size=3) | json_like,
        "weights": st.lists(st.floats() | st.integers() | text_like, max_size=3) | json_like,
    },
)


@st.composite
def deeply_nested(draw) -> bytes:
    """JSON nested far deeper than any parser recurses, at a place the schema reads."""
    depth = draw(st.sampled_from([1, 50, 900, 1000, 5000, 100_000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}"), ('{"segments":[', "]}")]))
    head, tail = draw(
        st.sampled_from(
            [
                ("", ""),
                ('{"segments": [{"text": ', "}]}"),
                ('{"segments": [', "]}"),
                ('{"conversations": [{"from": "human", "value": ', "}]}"),
                ('{"conversations": ', "}"),
                ('{"question": "q", "answers": ', "}"),
            ]
        )
    )
    cut = draw(st.booleans())  # unbalanced: the closers missing
    return (head + opener * depth + "0" + ("" if cut else closer * depth) + tail).encode()


def json_bytes(record: st.SearchStrategy) -> st.SearchStrategy:
    def dumps(value) -> bytes:
        return json.dumps(value).encode()

    dumped = record.map(dumps)
    broken = st.tuples(dumped, st.integers(0, 200)).map(lambda pair: pair[0][: pair[1]])
    return dumped | broken | deeply_nested() | st.binary(max_size=64) | st.just(b"")


def members_with(json_member: st.SearchStrategy, other_parts=("txt",)) -> st.SearchStrategy:
    """A sample: a json member (or none), maybe text parts, image parts (some empty)."""
    images = st.dictionaries(st.sampled_from(IMAGE_PARTS), st.sampled_from([b"", b"\xff\xd8\xff"]))
    texts = st.dictionaries(
        st.sampled_from(list(other_parts)), text_like.map(str.encode) | st.binary(max_size=16)
    )
    json_part = json_member.map(lambda data: {"json": data}) | st.just({})
    odd = st.dictionaries(st.text(max_size=6), st.binary(max_size=8), max_size=2)
    return st.tuples(json_part, texts, images, odd).map(
        lambda parts: {k: v for part in reversed(parts) for k, v in part.items()}
    )


# ---- the property -------------------------------------------------------------------------
def parse_or_skip(parse: Callable[[], object]) -> object:
    """``parse()``'s result, or the ``BadSample`` it raised (checked); anything else fails."""
    try:
        return parse()
    except BadSample as error:
        assert error.reason in SKIP_REASONS
        assert len(str(error)) <= MAX_MESSAGE, str(error)[:200]
        return error


def check_segments(result: object) -> None:
    if isinstance(result, BadSample):
        return
    assert isinstance(result, list) and result
    assert all(isinstance(item, (str, ImageRef)) for item in result)
    parse_or_skip(lambda: tokenize_segments(result, TOK))


def check_conversation_record(result: object) -> None:
    if isinstance(result, BadSample):
        return
    assert isinstance(result, dict)
    conversation = parse_or_skip(lambda: parse_llava_record(result))
    if not isinstance(conversation, BadSample):
        parse_or_skip(lambda: tokenize_conversation(conversation, ChatTemplate(), TOK))


FIELD_MAPS = {
    "CaptioningSample": {"image": "jpg,png,0.jpg", "caption": "json[segments][1][text],txt"},
    "VQASample": {
        "image": "jpg",
        "context": "json[question]",
        "answers": "json[answers]",
        "answer_weights": "json[weights]",
    },
    "InterleavedSample": {"sequence": "json[segments]"},
}


def energon(sample_type: str, **spec) -> EnergonRecords:
    if "field_map" not in spec and "sample_loader" not in spec:
        spec["field_map"] = FIELD_MAPS[sample_type]
    return EnergonRecords(DatasetSpec(sample_type=sample_type, **spec))


def run_parser(records, members: Dict[str, bytes], conversation: bool) -> None:
    """What the pipeline does with a sample: its record, then its tokens."""
    sizes, read = {ext: len(data) for ext, data in members.items()}, members.__getitem__
    if conversation:
        check_conversation_record(parse_or_skip(lambda: records.conversation(sizes, read)))
    else:
        check_segments(parse_or_skip(lambda: records.segments(sizes, read)))


PARSERS = {  # name: (record format, conversation?)
    "caption/interleaved": (NATIVE_RECORDS, False),
    "conversation": (NATIVE_RECORDS, True),
    "energon caption": (energon("CaptioningSample"), False),
    "energon interleaved": (energon("InterleavedSample"), False),
    "energon vqa": (energon("VQASample"), True),
}


@FUZZ
@given(deeply_nested(), st.sampled_from(["json", "txt"]))
def test_deeply_nested_json_parses_or_skips_everywhere(data, part):
    for records, conversation in PARSERS.values():
        run_parser(records, {part: data, "jpg": b"\xff\xd8\xff"}, conversation)


@FUZZ
@given(members_with(json_bytes(segments_record)))
def test_segment_records_parse_or_skip(members):
    run_parser(NATIVE_RECORDS, members, conversation=False)


@FUZZ
@given(members_with(json_bytes(llava_record)))
def test_conversation_records_parse_or_skip(members):
    run_parser(NATIVE_RECORDS, members, conversation=True)


@FUZZ
@given(llava_record | json_like)
def test_llava_structures_parse_or_skip(record):
    """Any JSON value where a record is expected (a record, or a sample loader's output)."""
    if isinstance(record, dict):
        check_conversation_record(record)


@FUZZ
@given(preference_record | json_like)
def test_preference_records_parse_or_skip(record):
    """As the shard writer checks a preference record and the source tokenizes it."""
    if not isinstance(record, dict):
        return
    pair = parse_or_skip(lambda: parse_preference_record(record))
    if not isinstance(pair, BadSample):
        for conversation in pair:
            parse_or_skip(lambda c=conversation: tokenize_answer(c, ChatTemplate(), TOK))


field_access = st.sampled_from(
    ["json", "json[0]", "json[question]", "txt", "jpg", "cls", "json[a][b][0]", "x]["]
) | st.text(max_size=12)


@FUZZ
@given(
    st.sampled_from(sorted(FIELD_MAPS)),
    st.dictionaries(st.sampled_from(["image", "caption", "context", "answers"]), field_access),
    members_with(json_bytes(vqa_record | segments_record), other_parts=("txt", "cls", "id")),
)
def test_energon_field_maps_parse_or_skip(sample_type, extra_map, members):
    records = energon(sample_type, field_map={**FIELD_MAPS[sample_type], **extra_map})
    run_parser(records, members, conversation=sample_type == "VQASample")


image_part = st.builds(ImagePart, st.sampled_from(IMAGE_PARTS) | st.text(max_size=4))
loaded_value = json_like | image_part | st.lists(image_part | text_like | json_like, max_size=5)
loaded_fields = st.fixed_dictionaries(
    {},
    optional={
        name: loaded_value
        for name in ("image", "caption", "sequence", "context", "answers", "answer_weights")
    },
)


@FUZZ
@given(
    st.sampled_from(sorted(FIELD_MAPS)),
    loaded_fields | json_like,
    members_with(json_bytes(json_like), other_parts=("txt", "cls")),
)
def test_energon_sample_loaders_parse_or_skip(sample_type, returned, members):
    """A dataset's sample loader returning anything, on parts holding anything."""

    def sample_loader(raw: dict):
        return returned if not isinstance(returned, list) else dict(enumerate(returned))

    records = energon(sample_type, sample_loader=sample_loader)
    run_parser(records, members, conversation=sample_type == "VQASample")
