"""Tokenizer and generator: round trips, determinism, and captions that match the pixels."""

import math

import numpy as np
import pytest
import torch

from mm1_megatron.data.synthetic import world as synthetic
from mm1_megatron.data.synthetic.world import (
    BACKGROUND_RGB,
    CELL_NAMES,
    COLOUR_RGB,
    Scene,
    ShapeSpec,
    SyntheticGenerator,
    draw_scene,
)
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer, Tokenizer, build_vocabulary

TOK = SyntheticTokenizer()
CELL_OF_WORDS = {words: cell for cell, words in enumerate(CELL_NAMES)}


def _gen(image_size=28):
    return SyntheticGenerator(TOK, image_size)


def test_tokenizer_special_ids_and_fixed_order():
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.image_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert TOK.vocabulary[4] == "red"
    assert build_vocabulary() == SyntheticTokenizer().vocabulary
    assert TOK.vocab_size == len(set(TOK.vocabulary))
    assert isinstance(TOK, Tokenizer)


def test_tokenizer_round_trip():
    text = "there are two shapes on a gray background : a red circle at the top left ."
    ids = TOK.encode(text)
    assert len(ids) == len(text.split())
    assert TOK.decode(ids) == text
    assert TOK.encode(TOK.decode(ids)) == ids
    # Punctuation splits off words; special tokens are recognised.
    assert TOK.encode("<bos> here is a picture: <image>.") == TOK.encode(
        "<bos> here is a picture : <image> ."
    )
    assert TOK.encode("<image>") == [TOK.image_token_id]


def test_encode_words_equals_encoding_the_joined_text():
    """The word-list fast path is ``encode`` of the words joined by spaces: every vocabulary
    entry is a single piece."""
    assert all(TOK.encode(word) == TOK.encode_words([word]) for word in TOK.vocabulary)
    rng = np.random.default_rng(0)
    for _ in range(200):
        words = [TOK.vocabulary[i] for i in rng.integers(0, TOK.vocab_size, 12)]
        assert TOK.encode_words(words) == TOK.encode(" ".join(words))


@pytest.mark.parametrize(
    "text, bad", [("a red elephant", "elephant"), ("Red", "Red"), ("is it !", "!")]
)
def test_tokenizer_unknown_word_raises(text, bad):
    with pytest.raises(ValueError, match=repr(bad)):
        TOK.encode(text)
    with pytest.raises(ValueError, match=repr(bad)):
        TOK.encode_words(text.split())
    with pytest.raises(ValueError):
        TOK.decode([TOK.vocab_size])


@pytest.mark.parametrize("source", synthetic.SOURCES)
def test_generator_is_deterministic(source):
    a = _gen().sample(source, np.random.default_rng(7))
    b = _gen().sample(source, np.random.default_rng(7))
    assert a.token_ids == b.token_ids
    assert len(a.images) == len(b.images)
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    others = [_gen().sample(source, np.random.default_rng(seed)) for seed in range(8, 12)]
    assert any(o.token_ids != a.token_ids for o in others)


NUM_IMAGES_RANGE = {"caption": (1, 1), "interleaved": (2, 4), "text": (0, 0)}


@pytest.mark.parametrize("source", synthetic.SOURCES)
def test_samples_are_well_formed(source):
    rng = np.random.default_rng(0)
    low, high = NUM_IMAGES_RANGE[source]
    for _ in range(30):
        sample = _gen().sample(source, rng)
        ids = sample.token_ids
        assert sample.source == source
        assert ids[0] == TOK.bos_token_id and ids[-1] == TOK.eos_token_id
        assert ids.count(TOK.image_token_id) == len(sample.images)
        assert low <= len(sample.images) <= high
        for image in sample.images:
            assert image.shape == (3, 28, 28) and image.dtype == torch.float32
            assert image.min() >= 0 and image.max() <= 1


def _parse_shapes(words):
    """(colour, shape, cell) for each 'a red circle at the top left' phrase in words."""
    found = []
    for i, word in enumerate(words):
        if word in COLOUR_RGB:
            j = i + 4  # colour shape at the <position words>
            assert words[i + 2 : j] == ["at", "the"]
            end = j
            while words[end] not in (",", "and", ".", ":"):
                end += 1
            found.append((word, words[i + 1], CELL_OF_WORDS[tuple(words[j:end])]))
    return found


def _caption_count(caption: str) -> int:
    """The shape count a caption states: 'there is one shape' / 'there are two shapes'."""
    return list(synthetic.vocab.NUMBER_WORDS).index(caption.split()[2]) + 1


def _cell_pixels(image, cell, image_size):
    row, col = divmod(cell, 3)
    rows = slice(row * image_size // 3, (row + 1) * image_size // 3)
    cols = slice(col * image_size // 3, (col + 1) * image_size // 3)
    return image.numpy()[:, rows, cols].reshape(3, -1).T  # [pixels, 3]


def _has_colour(pixels, rgb):
    return bool((pixels == np.array(rgb, dtype=np.float32)).all(axis=1).any())


def _assert_image_shows(image, shapes, image_size):
    """Shapes appear in exactly the mentioned cells, each with its mentioned colour."""
    corner = image[:, 0, 0].numpy()  # shapes never reach the border
    for cell in range(9):
        pixels = _cell_pixels(image, cell, image_size)
        mentioned = [s for s in shapes if s[2] == cell]
        assert bool((pixels != corner).any()) == bool(mentioned), (cell, shapes)
        for colour, _, _ in mentioned:
            assert _has_colour(pixels, COLOUR_RGB[colour]), (cell, colour)


@pytest.mark.parametrize("image_size", [28, 56, 378])
def test_caption_matches_pixels(image_size):
    rng = np.random.default_rng(3)
    for _ in range(10):
        sample = _gen(image_size).caption(rng)
        words = TOK.decode(sample.token_ids).split()
        image = sample.images[0]
        shapes = _parse_shapes(words)
        number = words[4]  # <bos> <image> there is/are <number>
        assert number == ["one", "two", "three"][len(shapes) - 1]
        background = words[words.index("background") - 1]
        assert torch.equal(image[:, 0, 0], torch.tensor(BACKGROUND_RGB[background]))
        _assert_image_shows(image, shapes, image_size)


def test_shape_areas_match_geometry():
    image_size, radius = 378, 0.33
    cell_px = image_size / 3
    expected = {
        "circle": math.pi * radius**2,
        "square": (1.7 * radius) ** 2,
        "triangle": 2 * radius**2,
    }
    for shape, area_cells in expected.items():
        scene = Scene("black", (ShapeSpec("red", shape, cell=4, radius=radius),))
        image = draw_scene(scene, image_size)
        area_px = int((image[0] == 1.0).sum())
        assert area_px == pytest.approx(area_cells * cell_px**2, rel=0.03), shape


def test_tiny_image_keeps_every_shape_visible():
    scene = Scene(
        "white",
        tuple(
            ShapeSpec(c, "triangle", cell=i, radius=0.28)
            for i, c in enumerate(["red", "blue", "green"])
        ),
    )
    image = draw_scene(scene, 12)
    pixels = image.numpy().reshape(3, -1).T
    for colour in ["red", "blue", "green"]:
        assert _has_colour(pixels, COLOUR_RGB[colour])
    with pytest.raises(ValueError):
        draw_scene(scene, 8)


def test_interleaved_text_describes_each_image():
    rng = np.random.default_rng(5)
    layouts_seen = set()
    for _ in range(20):
        sample = _gen().interleaved(rng)
        words = TOK.decode(sample.token_ids).split()
        assert 2 <= len(sample.images) <= 4
        all_shapes = _parse_shapes(words)
        total = synthetic.vocab.NUMBER_WORDS[len(all_shapes) - 1]
        assert words[-8:] == ["in", "total", "there", "are", total, "shapes", ".", "<eos>"]
        # Never adjacent: a captioned picture after "... : <image>" starts with "next ,".
        assert "<image> <image>" not in " ".join(words)
        segments = [segment.strip() for segment in " ".join(words).split("<image>")]
        assert len(segments) == len(sample.images) + 1
        for i, image in enumerate(sample.images):
            before, after = segments[i], segments[i + 1]
            if after.startswith("it shows"):  # described after the image
                layouts_seen.add("introduced")
                described = after[: after.index(" .") + 2]
            elif after.startswith("there"):  # captioned: "there are ... : <shapes> ."
                caption = after[: after.index(" .") + 2]
                described = caption[caption.index(" : ") + 3 :]
                assert _caption_count(caption) == len(_parse_shapes(described.split()))
                layouts_seen.add("captioned")
            else:  # described before: "the <ordinal> picture shows ... :"
                assert before.endswith(":")
                described = before[before.rindex("the " + synthetic.vocab.ORDINAL_WORDS[i]) :]
                layouts_seen.add("described_before")
            _assert_image_shows(image, _parse_shapes(described.split()), 28)
    assert layouts_seen == {"introduced", "captioned", "described_before"}


def test_text_sentences_are_consistent():
    numbers = list(synthetic.vocab.NUMBER_WORDS)
    rng = np.random.default_rng(11)
    for _ in range(50):
        sample = _gen().text(rng)
        assert sample.images == []
        words = TOK.decode(sample.token_ids[1:-1]).split()
        for i, word in enumerate(words):
            if word == "plus":
                a, b, c = (numbers.index(words[k]) + 1 for k in (i - 1, i + 1, i + 3))
                assert a + b == c
            if word == "count":
                run = words[i + 2 : words.index(".", i)]
                idx = [numbers.index(w) for w in run]
                assert idx == list(range(idx[0], idx[0] + len(idx)))
