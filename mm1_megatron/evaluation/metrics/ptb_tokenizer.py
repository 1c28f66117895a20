"""A pure-Python stand-in for pycocoevalcap's ``PTBTokenizer``.

pycocoevalcap joins all captions with newlines (after turning each caption's own ``\\n``
into a space), runs Stanford CoreNLP 3.4.1's Java ``PTBTokenizer -preserveLines
-lowerCase`` over the text, splits each output line on spaces and drops the tokens in its
punctuation list (``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``).
:func:`ptb_tokenize_batch` does the same without Java: a longest-match scanner over the
rules of :mod:`ptb_rules`, which were found by running the Java tokenizer on crafted
strings (every BMP character alone and between letters and digits, every abbreviation of a
24k-word vocabulary with each kind of following text, and random caption-like strings).

What matches the reference:

* lower-casing of every token, Java style (after tokenizing: ``-LRB-`` becomes ``-lrb-``,
  which the punctuation list, being upper case, no longer removes; ``-lsb-`` and the
  others for ``[ ] { }`` stay too);
* punctuation split from words, runs of ``?`` and ``!`` kept as one token (``!!!`` and
  ``?!`` survive the filter), ``word.word`` and ``a!b`` kept whole, ``...`` / ``. . .`` /
  ``\u2026`` as one ellipsis, two dots as two periods, 2+ hyphens and en/em dashes as ``--``;
* contractions: ``do n't``, ``ca n't``, ``wo n't``, ``it 's``, ``we 're``, ``i 'd 've``,
  ``can not``, ``gon na``, ``wan na``, ``got ta``, ``lem me``, ``gim me``, ``'t is``;
  kept whole: ``o'clock``, ``ma'am``, ``rock 'n' roll``, ``'90s``, ``'em``, ``y' all``;
  curly apostrophes as straight ones (``don\u2019t`` -> ``do n't``);
* quotes (all removed by the filter) and the split they cause;
* numbers: ``3.5``, ``1,000``, ``-5``, ``.5``, ``10:30``, dates ``12/25/2020``, fractions
  ``1/2`` and ``3 1/2`` (one token, with a no-break space that CIDEr's ``split()`` later
  splits), ``\u00bd`` -> ``1/2``; ``$ 5``, ``5 %``, ``\u00a3`` -> ``#``, ``\u20ac`` -> ``$``;
* hyphenated words (``t-shirt``, ``10-20``, ``non-u.s.``), ``and/or``, ``a/b/c``, URLs,
  e-mail addresses, ``@name``, ``#tag``, ``AT&T`` (only in capitals), ``5x5``, ``100km``;
* abbreviations that keep their period (``mr.``, ``dr.``, ``st.``, ``etc.``, ``inc.``,
  ``jan.``, ``e.g.``, ``u.s.``, ``p.m.``, any single letter, ``no.`` before a digit), with
  the reference's look at the next line: an abbreviation ending a line sees the first
  characters of the next caption (a single letter before ``A``/``The``/... loses its
  period: ``the letter b.`` followed by ``A cat`` gives ``b``);
* smileys (``:)`` -> ``:-rrb-``), ``<tag>`` SGML kept whole, symbols such as ``\u00b0 \u00a9
  \u00d7 %`` alone, control characters and characters outside the BMP (emoji) deleted,
  extra spaces, tabs, no-break and zero-width spaces ignored, Unicode letters and digits
  joined into words.

Measured agreement with the Java tokenizer (after the filter): no difference on 151k
abbreviation probes nor on a final 250k random strings (caption-like text with these
quirks, ASCII punctuation soup, mixed Unicode); ``tests/evaluation/test_ptb_tokenizer.py``
keeps a live comparison.

Known divergences: letters and digits are Python's Unicode categories, so code points
assigned after the Java lexer's Unicode version (6.x) and combining marks outside
U+0300-U+036F can split differently; only abbreviations and sentence starters found with
the probe vocabulary are known; Java's final-sigma lower-casing (which depends on its word
boundaries) is approximated; JFlex always takes the longest match while Python's regex
alternation takes the first, which the patterns follow where it was found to matter; line
breaks other than ``\\n`` inside a caption (``\\r``, U+2028, ...) break the reference's
caption alignment (every later caption shifts), while here they only separate tokens.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import List, Sequence

from mm1_megatron.evaluation.metrics.ptb_rules import RULES, SPACE

logger = logging.getLogger(__name__)

# pycocoevalcap's list of tokens removed after tokenizing (case-sensitive).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-"]
    + ["--", "...", ";"]
)


# Spaces from an ASCII one on, or an ASCII word before them or a line end: no rule reads
# further (a run starting with another space character can begin a URL).
_PLAIN = re.compile(f"([A-Za-z]+)(?: {SPACE}*|(?=\\n)|\\Z)| {SPACE}*")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "wanna", "lemme", "gimme"])


def _lex(text: str) -> List[str]:
    """Raw tokens of ``text`` (before lower-casing and filtering); ``"\\n"`` ends a line."""
    tokens: List[str] = []
    pos, end = 0, len(text)
    while pos < end:
        plain = _PLAIN.match(text, pos)
        if plain is not None and (plain.group(1) or "").lower() not in _SPLIT_WORDS:
            if plain.group(1):
                tokens.append(plain.group(1))
            pos = plain.end()
            continue
        best, best_len = None, 0
        for rule in RULES:
            match = rule.regex.match(text, pos)
            if match is not None and match.end() - pos > best_len:
                best, best_len = (rule, match.group("m")), match.end() - pos
        if best is None:  # untokenizable: the reference deletes it (with a warning)
            logger.debug("untokenizable character U+%04X deleted", ord(text[pos]))
            pos += 1
            continue
        emitted, consumed = best[0].action(best[1])
        tokens.extend(emitted)
        pos += consumed
    return tokens


def _word_edge(token: str, j: int) -> bool:
    """Whether Java's word ends at ``token[j]`` (as observed): kana, ideographs, a hyphen
    next to a digit, punctuation other than hyphens, periods and apostrophes."""
    char = token[j]
    if "\u3040" <= char <= "\u30ff" or "\u3400" <= char <= "\u9fff" or char >= "\uf900":
        return True
    if char in "-\u2010\u2011":
        return any(c.isdigit() for c in token[max(j - 1, 0) : j + 2])
    return not (char.isalnum() or char in ".'\u2019" or unicodedata.category(char)[0] == "M")


def _final_sigma(token: str, i: int) -> bool:
    """Java's final sigma: a cased letter before it in its word and none after."""
    cased = [c.lower() != c.upper() for c in token]
    before = next((j for j in range(i - 1, -1, -1) if cased[j] or _word_edge(token, j)), None)
    after = next((j for j in range(i + 1, len(token)) if cased[j] or _word_edge(token, j)), None)
    return before is not None and cased[before] and (after is None or not cased[after])


def _lower(token: str) -> str:
    """Java's lower-casing (a capital sigma ending a word becomes a final sigma)."""
    if "\u03a3" not in token:
        return token.lower()
    return "".join(
        "\u03c2" if c == "\u03a3" and _final_sigma(token, i) else c.lower()
        for i, c in enumerate(token)
    )


def _filter(tokens: Sequence[str]) -> List[str]:
    """Lower-case, then drop punctuation the way pycocoevalcap does (after its space split)."""
    line = " ".join(_lower(t) for t in tokens).rstrip()
    return [t for t in line.split(" ") if t not in PUNCTUATIONS and t]


def ptb_tokenize_batch(texts: Sequence[str]) -> List[List[str]]:
    """Tokenize captions as one pycocoevalcap ``PTBTokenizer.tokenize`` call would.

    The captions are joined with newlines as in the reference, so an abbreviation at the
    end of one caption sees the start of the next. Returns one token list per caption.
    """
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"caption {index} is a {type(text).__name__}, not a str")
    if not texts:
        return []
    lines: List[List[str]] = [[]]
    for token in _lex("\n".join(t.replace("\n", " ") for t in texts)):
        if token == "\n":
            lines.append([])
        else:
            lines[-1].append(token)
    return [_filter(line) for line in lines]


def ptb_tokenize(text: str) -> List[str]:
    """The tokens pycocoevalcap's PTB tokenizer gives ``text`` alone (its last line)."""
    return ptb_tokenize_batch([text])[0]
