"""The pure-Python PTB tokenizer against pycocoevalcap's (Stanford CoreNLP 3.4.1 in Java).

The hand-picked expectations were produced by the Java tokenizer; the live test reruns it
(one Java call) on a few hundred generated caption-like strings when java is installed.
"""

from __future__ import annotations

import random

import pytest

from mm1_megatron.evaluation.metrics import ptb_tokenize
from mm1_megatron.evaluation.metrics.ptb_tokenizer import ptb_tokenize_batch
from tests.evaluation.make_cider_golden import reference_unavailable

CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("TWO Dogs Playing In The SNOW!", "two dogs playing in the snow"),
    ("  lots   of\tspaces\xa0and\u3000more  ", "lots of spaces and more"),
    ("A cat, a dog; a bird: a fish!", "a cat a dog a bird a fish"),
    ("Is it a cat?! No!!! Really??", "is it a cat ?! no !!! really ??"),
    (
        "The dog isn't happy and can't swim, it won't eat.",
        "the dog is n't happy and ca n't swim it wo n't eat",
    ),
    (
        "I'm sure you're right, we've seen they'd go and she'll stay.",
        "i 'm sure you 're right we 've seen they 'd go and she 'll stay",
    ),
    ("don\u2019t it\u2019s the dog\u2019s bone", "do n't it 's the dog 's bone"),
    ("the dogs' bowls and James' car", "the dogs bowls and james car"),
    (
        "I cannot believe we're gonna wanna go, gotta run, lemme see, gimme that",
        "i can not believe we 're gon na wan na go got ta run lem me see gim me that",
    ),
    (
        "at 5 o'clock ma'am, rock 'n' roll from the '90s, y'all",
        "at 5 o'clock ma'am rock 'n' roll from the '90s y' all",
    ),
    ("a sign that says \"stop\" and 'yield'", "a sign that says stop and yield"),
    (
        "\u201ccurly\u201d and \u2018single\u2019 and \u00abguillemets\u00bb",
        "curly and single and guillemets",
    ),
    (
        "a man (in a hat) holds a [red] {blue} sign",
        "a man -lrb- in a hat -rrb- holds a -lsb- red -rsb- -lcb- blue -rcb- sign",
    ),
    (
        "a t-shirt, an x-ray, a well-known e-mail, 10-20 years",
        "a t-shirt an x-ray a well-known e-mail 10-20 years",
    ),
    ("an ellipsis... and two dots.. then four....", "an ellipsis and two dots then four"),
    ("a dash -- and an en \u2013 and em \u2014 dash, a---b", "a dash and an en and em dash a b"),
    (
        "it costs $3.50 or 1,000,000 dollars, 50% off, -5 degrees",
        "it costs $ 3.50 or 1,000,000 dollars 50 % off -5 degrees",
    ),
    (
        "1/2 of a pizza and 3 1/2 slices, \u00bd a cake, on 12/25/2020 at 10:30",
        "1/2 of a pizza and 3\xa01/2 slices 1/2 a cake on 12/25/2020 at 10:30",
    ),
    ("\u00a35 and \u20ac10 and 5\u00a2 and \u00a510", "# 5 and $ 10 and 5 cents and \u00a5 10"),
    ("and/or a/b/c the 1980s 2nd 5th 100km 5x5 3x", "and/or a/b/c the 1980s 2nd 5th 100km 5x5 3x"),
    (
        "Mr. Smith and Dr. Jones on St. Patrick's day",
        "mr. smith and dr. jones on st. patrick 's day",
    ),
    (
        "in the U.S. and the U.K., e.g. in Washington D.C. etc.",
        "in the u.s. and the u.k. e.g. in washington d.c. etc.",
    ),
    ("at 5 p.m. on Jan. 5, see fig. 3 and no. 7", "at 5 p.m. on jan. 5 see fig. 3 and no. 7"),
    ("approx. 5 ft. tall, approx., vs. the rest", "approx 5 ft. tall approx. vs. the rest"),
    ("the letter a. the letter b", "the letter a. the letter b"),
    (
        "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber",
        "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber",
    ),
    (
        "\u65e5\u672c \u041c\u043e\u0441\u043a\u0432\u0430 \u0391\u03a3",
        "\u65e5\u672c \u043c\u043e\u0441\u043a\u0432\u0430 \u03b1\u03c2",
    ),
    ("an emoji \U0001f600 and a pizza \U0001f355 slice", "an emoji and a pizza slice"),
    (
        "ctrl\x01chars\x7f and zero\u200bwidth and soft\u00adhyphen",
        "ctrl chars and zero width and softhyphen",
    ),
    ("a smiley :) and :-( and ;) and <3", "a smiley :-rrb- and :--lrb- and ;-rrb- and < 3"),
    ("AT&T and R&D, a & b, a&b", "at&t and r&d a & b a & b"),
    (
        "visit www.google.com or http://example.com/a?b=c or foo.com",
        "visit www.google.com or http://example.com/a?b=c or foo.com",
    ),
    ("mail me@example.com or @user about #topic", "mail me@example.com or @user about #topic"),
    ("a <b>bold</b> tag", "a <b> bold </b> tag"),
    (
        "symbols \u00b0 \u00a9 \u00d7 \u2022 * ** ~ ^ | = + < > \\",
        "symbols \u00b0 \u00a9 \u00d7 \u2022 * ** ~ ^ | = + < > \\",
    ),
    (
        "dog.cat a.b.c word.5 v2.0 3..4 what?no hello!world",
        "dog.cat a.b.c word .5 v2 .0 3 .4 what?no hello!world",
    ),
    ("C# and c++ code, 5.jpg files", "c# and c++ code 5.jpg files"),
    ("'tis the season, 'twas the night", "'t is the season 't was the night"),
    ("IT'S THE DOG'S", "it 's the dog 's"),
    ("a 555-1234 phone and (555) 555-1234", "a 555-1234 phone and -lrb-555-rrb-\xa0555-1234"),
    ("the '12 season", "the '12 season"),
    ("", ""),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_hand_picked(text, expected):
    assert ptb_tokenize(text) == (expected.split(" ") if expected else [])


@pytest.mark.parametrize(
    "captions,expected",
    [
        # An acronym at a caption's end sees the next caption: before "A" a letter's period
        # is a sentence end (then dropped as punctuation); before "a" it stays.
        (["the letter b.", "A cat"], [["the", "letter", "b"], ["a", "cat"]]),
        (["the letter b.", "a cat"], [["the", "letter", "b."], ["a", "cat"]]),
        (["made in the U.S.", "The end"], [["made", "in", "the", "u.s."], ["the", "end"]]),
        (["x a.", "", "A"], [["x", "a."], [], ["a"]]),
        (["a.", "b."], [["a."], ["b."]]),
        ([], []),
    ],
)
def test_batch_sees_the_next_caption(captions, expected):
    assert ptb_tokenize_batch(captions) == expected


def test_line_breaks_inside_a_caption_only_separate_tokens():
    assert ptb_tokenize_batch(["a\rb\u2028c\r\nd", "e"]) == [["a", "b", "c", "d"], ["e"]]


def test_rejects_non_strings():
    with pytest.raises(ValueError, match="caption 1 is a int"):
        ptb_tokenize_batch(["a dog", 3])


WORDS = (
    "a an the man woman dog cat two people street car is are sitting on of with in red blue "
    "large small table next to near white black riding bike holding umbrella pizza plate"
).split()
STARTS = ["A", "The", "Two", "An", "This", "There", "It", "Some", "I", "One", "Man", "Mr.", "Dr."]
QUIRKS = (
    "t-shirt x-ray e-mail well-known 10-20 50% $5 3.5 1,000 .5 -5 10:30 5pm a.m. p.m. 1/2 "
    "12/25/2020 1980s '90s 2nd 100km 5x5 #1 @user #tag don't can't won't isn't it's I'm "
    "you're we've they'd she'll dog's dogs' cannot gonna wanna o'clock ma'am y'all 'em ain't "
    "don\u2019t it\u2019s (dog) ( ) [ ] { } \" ' ` `` '' \u201c \u201d \u2018 \u2019 \u00ab "
    "\u00bb . , ; : ! ? !! ?! ... .. .... \u2026 - -- --- \u2013 \u2014 / \\ & AT&T R&D * ** _ "
    "~ ^ | = + < > <b> % # @ \u00b0 \u00a9 \u00d7 \u2022 \u00bd \u00a3 \u20ac \u00a5 \u00a2 "
    "etc. etc e.g. i.e. U.S. U.S.A. U.K. D.C. T.V. TV vs. Mr. Dr. St. st. Jan. Inc. No. no. "
    "approx. ft. a. b. x. caf\u00e9 na\u00efve \u00fcber \u65e5\u672c \u041c\u043e\u0441\u043a"
    "\u0432\u0430 \u03b1\u03b2\u03b3 \U0001f600 \u00a0 \u200b \t www.google.com http://x.com/a "
    "foo.com dog.cat a.b.c v2.0 and/or a/b/c dog_cat <3 :) :-) ;) :( :D x@y.com soft\u00adhyphen "
    "a\x01b word.5 3..4 what?! hello!world HELLO McDonald's O'Neill I'd've 'tis cont'd goin' "
    "10a.m. 555-1234 C# c++ 5.jpg"
).split(" ")
JOINERS = ["", "", "  ", "\t", "-", "/", ".", ",", "'"]
ENDINGS = [".", " .", "!", "?", "", " ", ". ", "..", "...", ","]


def caption_corpus(count: int, seed: int = 0) -> list:
    """Deterministic caption-like strings: common words, capitals, quirks, odd joins."""
    rng = random.Random(seed)
    captions = []
    for _ in range(count):
        parts = [rng.choice(STARTS)] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 14)):
            roll = rng.random()
            if roll < 0.55:
                parts.append(rng.choice(WORDS))
            elif roll < 0.62:
                word = rng.choice(WORDS)
                parts.append(word.capitalize() if roll < 0.59 else word.upper())
            else:
                parts.append(rng.choice(QUIRKS))
        text = parts[0]
        for part in parts[1:]:
            text += (" " if rng.random() < 0.8 else rng.choice(JOINERS)) + part
        captions.append(text + (rng.choice(ENDINGS) if rng.random() < 0.6 else ""))
    return captions


def reference_tokenize(captions: list) -> list:
    """pycocoevalcap's PTBTokenizer (one Java call) on the captions, in order."""
    if reference_unavailable():
        pytest.skip(reference_unavailable())
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return [out[i][0] for i in range(len(captions))]


@pytest.mark.slow
def test_matches_pycocoevalcap_on_a_caption_corpus():
    captions = caption_corpus(400) + [text for text, _ in CASES]
    reference = reference_tokenize(captions)
    ours = [" ".join(tokens) for tokens in ptb_tokenize_batch(captions)]
    mismatches = [(c, r, o) for c, r, o in zip(captions, reference, ours) if r != o]
    assert not mismatches, mismatches[:5]
