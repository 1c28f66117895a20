"""VQA accuracy: each rule of the official normalisation, the 10-annotator arithmetic,
OpenFlamingo's variant, and input checks. The expectations follow the reference code's
rules (checked, outside this suite, against both reference implementations)."""

from __future__ import annotations

import pytest

from mm1_megatron.evaluation.metrics import vqa_accuracy, vqa_corpus_accuracy
from mm1_megatron.evaluation.metrics.vqa import normalize_answer

OTHERS = ["dog", "bird", "fish", "horse", "cow", "goat", "duck", "frog", "mouse", "bee"]


def answers_with(answer: str, count: int, total: int = 10) -> list:
    """``count`` copies of ``answer`` and distinct other answers, ``total`` in all."""
    return [answer] * count + OTHERS[: total - count]


@pytest.mark.parametrize(
    "matching,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)]
)
def test_matching_annotators_out_of_ten(matching, expected):
    accuracy = vqa_accuracy("cat", answers_with("cat", matching))
    assert accuracy == pytest.approx(expected, abs=1e-9)


def test_leave_one_out_with_fewer_answers():
    # 3 answers, 2 match: leaving out a match keeps 1 (1/3), leaving out the other keeps 2.
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx((1 + 1 + 2) / 9)


@pytest.mark.parametrize(
    "raw,normalized",
    [
        # punctuation next to a space is deleted, elsewhere it becomes a space
        ("yes!", "yes"),
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("x-ray", "x ray"),
        ("(yes)", "yes"),
        ('"yes"', "yes"),
        ("a/b", "b"),  # "a" becomes a word, then an article
        ("@home", "home"),
        # a comma between digits anywhere: every mark is deleted
        ("1,000", "1000"),
        ("1,000 (approx)", "1000 approx"),
        # apostrophes and colons are not in the punctuation list
        ("don't", "don't"),
        ("10:30", "10:30"),
        # periods go unless a digit follows; at most 32 of them
        ("yes.", "yes"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("mr. smith", "mr smith"),
        ("e.g.", "eg"),
        ("yes" + "." * 32, "yes"),
        ("yes" + "." * 35, "yes..."),
        # case, whitespace, number words, articles
        ("  YES\n", "yes"),
        ("yes\tno", "yes no"),
        ("Two", "2"),
        ("none", "0"),
        ("ten dogs", "10 dogs"),
        ("eleven", "eleven"),
        ("a dog", "dog"),
        ("the red car", "red car"),
        ("an apple", "apple"),
        # contractions written without their apostrophe
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("oclock", "o'clock"),
        ("yall", "y'all"),
        ("wont go", "won't go"),
    ],
)
def test_normalization_rules(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_normalization_applies_to_both_sides_when_annotators_disagree():
    answers = ["two"] * 4 + ["three"] * 6
    assert vqa_accuracy("2", answers) == pytest.approx(1.0)
    assert vqa_accuracy("A dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("dont", ["don't"] * 5 + ["no"] * 5) == pytest.approx(1.0)


def test_official_leaves_unanimous_answers_unnormalized():
    unanimous = ["yes"] * 10
    assert vqa_accuracy("yes", unanimous) == 1.0
    assert vqa_accuracy(" yes\n", unanimous) == 1.0  # only stripped
    assert vqa_accuracy("Yes", unanimous) == 0.0
    assert vqa_accuracy("yes.", unanimous) == 0.0


def test_openflamingo_always_normalizes():
    unanimous = ["yes"] * 10
    assert vqa_accuracy("Yes.", unanimous, mode="openflamingo") == 1.0
    assert vqa_accuracy("two", ["2"] * 10, mode="openflamingo") == 1.0
    assert vqa_accuracy("two", ["2"] * 10, mode="official") == 0.0
    mixed = ["two"] * 2 + ["three"] * 8
    assert vqa_accuracy("2", mixed, mode="openflamingo") == pytest.approx(0.6)


def test_unanswerable_is_an_ordinary_answer():
    vizwiz = ["unanswerable"] * 7 + ["blue", "navy", "blue"]
    assert vqa_accuracy("unanswerable", vizwiz) == pytest.approx(1.0)
    assert vqa_accuracy("Unanswerable.", vizwiz) == pytest.approx(1.0)
    assert vqa_accuracy("blue", vizwiz) == pytest.approx(0.6)
    assert vqa_accuracy("Unanswerable", ["unanswerable"] * 10) == 0.0
    assert vqa_accuracy("Unanswerable", ["unanswerable"] * 10, mode="openflamingo") == 1.0


def test_corpus_accuracy():
    predictions = {1: "cat", 2: "yes", "q3": "unanswerable"}
    answers = {1: answers_with("cat", 1), 2: ["yes"] * 10, "q3": answers_with("blue", 10)}
    mean, per_id = vqa_corpus_accuracy(predictions, answers)
    assert per_id == pytest.approx({1: 0.3, 2: 1.0, "q3": 0.0})
    assert mean == pytest.approx(1.3 / 3)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: vqa_accuracy("a", ["a"], mode="vizwiz"), "unknown VQA accuracy mode"),
        (lambda: vqa_accuracy("a", []), "non-empty list of strings"),
        (lambda: vqa_accuracy("a", "a"), "non-empty list of strings"),
        (lambda: vqa_accuracy(None, ["a"]), "prediction must be a string, got NoneType"),
        (lambda: vqa_accuracy("a", ["a", 3]), "must all be strings"),
        (lambda: vqa_corpus_accuracy({1: "a"}, {1: ["a"], 2: ["b"]}), "question 2 has answers"),
        (lambda: vqa_corpus_accuracy({1: "a", 9: "b"}, {1: ["a"]}), "question 9 has a prediction"),
        (lambda: vqa_corpus_accuracy({1: 5}, {1: ["a"]}), "prediction of question 1 must be"),
        (lambda: vqa_corpus_accuracy({}, {}), "no questions to score"),
    ],
)
def test_rejects_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call()
