"""VQA accuracy with the official answer normalisation (VQA v2, OK-VQA, VizWiz, TextVQA).

``mode="official"`` follows ``vqaEval.py`` of GT-Vision-Lab/VQA (master, "Fixed processing
answers bug"), reimplemented here:

* the prediction and every ground-truth answer: newlines and tabs to spaces, then stripped;
* only when the ground-truth answers are not all the same string, both sides are then
  normalised (so a unanimous ``yes`` does not match a predicted ``Yes``, as there):

  - punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: each mark is deleted where
    the text has it next to a space or has a comma between two digits anywhere (``1,000``
    becomes ``1000``), and becomes a space otherwise (``red,white`` -> ``red white``);
    ``'`` and ``:`` are kept;
  - periods not followed by a digit are deleted (``3.5`` stays), at most 32 of them: the
    reference passes ``re.UNICODE`` (32) where ``re.sub`` takes its count;
  - lower-case, split on whitespace, number words ``none zero one ... ten`` to digits
    (``none`` -> ``0``), articles ``a an the`` dropped, and the reference's contraction
    table applied word by word (``dont`` -> ``don't``, ``oclock`` -> ``o'clock``);

* the score is the mean over the answers of ``min(1, matches among the others / 3)``
  (leave-one-out: with 10 answers, 1, 2, 3, 4+ matching give 0.3, 0.6, 0.9, 1.0).

``mode="openflamingo"`` is OpenFlamingo's ``vqa_metric.py`` (open_flamingo master): the
same rules and table, but both sides are always normalised, unanimous or not. Its
generation post-processing (cutting the output at "Question", "Answer", "Short" and the
first ", ") belongs to the caller. VizWiz's ``unanswerable`` is an ordinary answer.
Answers are told apart by position, as the reference's answer records (unique
``answer_id``) are. Scores are fractions in [0, 1]; the reference reports
``round(100 * mean, 2)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Dict, Hashable, Tuple

__all__ = ["normalize_answer", "vqa_accuracy", "vqa_corpus_accuracy"]

MODES = ("official", "openflamingo")
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_IN_NUMBER = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_MAX_PERIODS = 32
_NUMBER_WORDS = "none zero one two three four five six seven eight nine ten".split()
_NUMBERS = dict(zip(_NUMBER_WORDS, "0 0 1 2 3 4 5 6 7 8 9 10".split()))
_ARTICLES = frozenset(["a", "an", "the"])

# The reference's table maps a contraction written with one of its apostrophes left out
# (each one in turn) to the full form; listed here by full form.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll
ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at
shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd
who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all
y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _contraction_table() -> Dict[str, str]:
    table = {"let's": "let's", "she's": "she's", "somebody'd": "somebodyd"}  # as listed there
    for full in _CONTRACTED:
        cuts = [i for i, char in enumerate(full) if char == "'"]
        table.update({full[:i] + full[i + 1 :]: full for i in cuts})
    return table


_CONTRACTIONS = _contraction_table()


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    """The reference's punctuation pass: delete or space out marks, then drop periods."""
    glue_all = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        glued = glue_all or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if glued else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def _normalize_words(text: str) -> str:
    """Lower-case, number words to digits, no articles, contractions fixed."""
    words = (_NUMBERS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The full normalisation of one answer (what both modes apply when they normalise)."""
    return _normalize_words(_strip_punctuation(_clean(text)))


def _check(prediction: object, answers: object, mode: str, where: str = "") -> None:
    if mode not in MODES:
        raise ValueError(f"unknown VQA accuracy mode {mode!r}; expected one of {MODES}")
    if not isinstance(prediction, str):
        raise ValueError(f"prediction{where} must be a string, got {type(prediction).__name__}")
    if isinstance(answers, str) or not isinstance(answers, Sequence) or not answers:
        raise ValueError(f"answers{where} must be a non-empty list of strings")
    if not all(isinstance(answer, str) for answer in answers):
        raise ValueError(f"answers{where} must all be strings")


def vqa_accuracy(prediction: str, answers: Sequence[str], mode: str = "official") -> float:
    """Accuracy of one predicted answer against the annotators' answers (usually 10)."""
    _check(prediction, answers, mode)
    predicted, truths = _clean(prediction), [_clean(answer) for answer in answers]
    if mode == "openflamingo" or len(set(truths)) > 1:
        predicted = normalize_answer(predicted)
        truths = [normalize_answer(truth) for truth in truths]
    hits = [truth == predicted for truth in truths]
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def vqa_corpus_accuracy(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    mode: str = "official",
) -> Tuple[float, Dict[Hashable, float]]:
    """(mean accuracy, accuracy per question id) over the ids of ``answers``."""
    if not isinstance(predictions, Mapping) or not isinstance(answers, Mapping):
        raise ValueError("predictions and answers must be dicts keyed by question id")
    if not answers:
        raise ValueError("no questions to score: answers is empty")
    for key in answers:
        if key not in predictions:
            raise ValueError(f"question {key!r} has answers but no prediction")
    for key in predictions:
        if key not in answers:
            raise ValueError(f"question {key!r} has a prediction but no answers")
    per_id: Dict[Hashable, float] = {}
    for key, truths in answers.items():
        _check(predictions[key], truths, mode, where=f" of question {key!r}")
        per_id[key] = vqa_accuracy(predictions[key], truths, mode)
    return sum(per_id.values()) / len(per_id), per_id
