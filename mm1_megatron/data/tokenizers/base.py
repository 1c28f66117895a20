"""Tokenizers for the data pipeline: the ``Tokenizer`` interface and a word-level one.

``SyntheticTokenizer`` knows exactly the words the synthetic generator emits, one id per
word, so a tiny model learns the synthetic data without a subword vocabulary. It cannot
tokenize arbitrary text: it is case-sensitive, splits only on whitespace and on the
punctuation marks ``.``, ``,``, ``:`` and ``?``, and raises ``ValueError`` on any other word.
A sentencepiece or Hugging Face tokenizer can replace it by implementing ``Tokenizer``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Protocol, Sequence, Tuple, runtime_checkable

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>")

# Word groups, in vocabulary order. The generator in ``synthetic.py`` draws from these,
# so the vocabulary always covers everything it can emit.
SHAPE_COLOUR_WORDS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan")
BACKGROUND_WORDS = ("black", "white", "gray")
SHAPE_WORDS = ("circle", "square", "triangle")
NUMBER_WORDS = (
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
)
ORDINAL_WORDS = ("first", "second", "third", "fourth")
POSITION_WORDS = ("top", "middle", "bottom", "left", "center", "right")
WEEKDAY_WORDS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
FUNCTION_WORDS = (
    "a",
    "an",
    "the",
    "and",
    "at",
    "on",
    "is",
    "are",
    "there",
    "it",
    "of",
    "in",
    "shape",
    "shapes",
    "background",
    "here",
    "picture",
    "shows",
    "next",
    "another",
    "total",
    "let",
    "us",
    "count",
    "days",
    "week",
    "plus",
)
PUNCTUATION = (".", ",", ":")
# The default chat template's markers (``data/shards/conversations.py``), and words of
# the synthetic conversations. Last, so the ids of the words above never move.
CHAT_WORDS = (
    "<system>",
    "<user>",
    "<assistant>",
    "<end_turn>",
    "?",
    "what",
    "how",
    "many",
    "where",
    "nothing",
    "describe",
    "yes",
    "no",
)

# The synthetic videos' frame-time markers and events (``data/synthetic/video.py``).
# After the chat words, so no earlier id moves.
VIDEO_WORDS = ("time", "zero", "moves", "turns", "appears", "up", "down")

WORD_GROUPS: Tuple[Tuple[str, ...], ...] = (
    SHAPE_COLOUR_WORDS,
    BACKGROUND_WORDS,
    SHAPE_WORDS,
    NUMBER_WORDS,
    ORDINAL_WORDS,
    POSITION_WORDS,
    WEEKDAY_WORDS,
    FUNCTION_WORDS,
    PUNCTUATION,
    CHAT_WORDS,
    VIDEO_WORDS,
)

# A special token, a run of word characters, or one punctuation character.
_PIECE = re.compile(r"<[^<>\s]+>|\w+|[^\w\s]")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    ``encode`` must not add bos/eos itself: the generator adds them explicitly.
    """

    vocab_size: int
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    image_token_id: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def build_vocabulary() -> Tuple[str, ...]:
    """Special tokens first (ids 0-3), then every word group in its fixed order."""
    vocabulary = list(SPECIAL_TOKENS)
    for group in WORD_GROUPS:
        vocabulary.extend(group)
    duplicates = sorted({word for word in vocabulary if vocabulary.count(word) > 1})
    if duplicates:
        raise AssertionError(f"words listed twice in the vocabulary: {duplicates}")
    return tuple(vocabulary)


class SyntheticTokenizer:
    """Word-level tokenizer over the synthetic vocabulary (see module docstring)."""

    def __init__(self):
        self.vocabulary: Tuple[str, ...] = build_vocabulary()
        self._ids: Dict[str, int] = {word: i for i, word in enumerate(self.vocabulary)}
        self.vocab_size = len(self.vocabulary)
        # The size before VIDEO_WORDS were appended (no earlier id moved): what data
        # fingerprints record, so corpora and runs from before video still resume.
        self.fingerprint_vocab_size = self.vocab_size - len(VIDEO_WORDS)
        self.pad_token_id = self._ids["<pad>"]
        self.bos_token_id = self._ids["<bos>"]
        self.eos_token_id = self._ids["<eos>"]
        self.image_token_id = self._ids["<image>"]

    def encode(self, text: str) -> List[int]:
        """Ids of the words in ``text``; special tokens may be written as ``<image>`` etc."""
        ids = []
        for piece in _PIECE.findall(text):
            if piece not in self._ids:
                raise ValueError(
                    f"word {piece!r} is not in the synthetic vocabulary "
                    f"({self.vocab_size} words); SyntheticTokenizer only "
                    f"knows the words the synthetic generator emits"
                )
            ids.append(self._ids[piece])
        return ids

    def encode_words(self, words: Sequence[str]) -> List[int]:
        """``encode(" ".join(words))`` for words of the vocabulary, one id each, without
        the text round trip (every vocabulary entry is one piece: a test checks it); the
        synthetic world's hot path."""
        try:
            return [self._ids[word] for word in words]
        except KeyError as missing:
            raise ValueError(
                f"word {missing.args[0]!r} is not in the synthetic vocabulary "
                f"({self.vocab_size} words)"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """Words joined by single spaces (punctuation too), so ``encode`` inverts it."""
        words = []
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(
                    f"token id {token} is outside the vocabulary [0, {self.vocab_size})"
                )
            words.append(self.vocabulary[token])
        return " ".join(words)
