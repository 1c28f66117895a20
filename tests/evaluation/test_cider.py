"""CIDEr-D against pycocoevalcap: committed golden scores, a live run, input validation."""

from __future__ import annotations

import json

import pytest

from mm1_megatron.evaluation.metrics import cider_d
from mm1_megatron.evaluation.metrics.ptb_tokenizer import ptb_tokenize_batch
from tests.evaluation.make_cider_golden import (
    FIXTURE,
    build_examples,
    reference_cider,
    reference_unavailable,
)

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def golden():
    return json.loads(FIXTURE.read_text())


def test_golden_scores(golden):
    score, per_id = cider_d(golden["references"], golden["predictions"])
    assert score == pytest.approx(golden["score"], abs=TOLERANCE)
    assert list(per_id) == list(golden["per_id"])
    for key, expected in golden["per_id"].items():
        assert per_id[key] == pytest.approx(expected, abs=TOLERANCE), key


def test_golden_tokenization(golden):
    """The same tokens as pycocoevalcap's Java tokenizer, so the scores agree for a reason."""
    refs = golden["references"]
    flat = ptb_tokenize_batch([c for key in refs for c in refs[key]])
    expected = [c for key in refs for c in golden["tokenized_references"][key]]
    assert [" ".join(tokens) for tokens in flat] == expected
    preds = ptb_tokenize_batch([golden["predictions"][key] for key in refs])
    assert [" ".join(t) for t in preds] == [golden["tokenized_predictions"][k] for k in refs]


@pytest.mark.slow
def test_matches_pycocoevalcap_live():
    if reference_unavailable():
        pytest.skip(reference_unavailable())
    references, predictions = build_examples(300, seed=7)
    expected = reference_cider(references, predictions)
    score, per_id = cider_d(references, predictions)
    worst = max(abs(per_id[key] - value) for key, value in expected["per_id"].items())
    assert abs(score - expected["score"]) <= TOLERANCE
    assert worst <= TOLERANCE


def test_perfect_and_disjoint_predictions():
    references = {
        1: ["a dog runs on the beach", "a dog running on sand"],
        2: ["two cats sleep on a bed", "cats sleeping on a bed"],
        3: ["a man rides a red bike", "a man riding a bicycle"],
    }
    perfect, per_id = cider_d(references, {k: v[0] for k, v in references.items()})
    assert perfect > 1.0 and all(s > 0 for s in per_id.values())
    disjoint, per_id = cider_d(references, {1: "zebra", 2: "giraffe", 3: "kite"})
    assert disjoint == 0.0 and set(per_id.values()) == {0.0}


def test_one_id_scores_zero_like_the_reference():
    assert cider_d({"x": ["a dog"]}, {"x": "a dog"}) == (0.0, {"x": 0.0})


@pytest.mark.parametrize(
    "references,predictions,message",
    [
        ({"a": ["x"], "b": ["y"]}, {"a": "x"}, "id 'b' has references but no prediction"),
        ({"a": ["x"]}, {"a": "x", 7: "y"}, "id 7 has a prediction but no references"),
        ({"a": ["x"], "b": []}, {"a": "x", "b": "y"}, "id 'b' has an empty list of references"),
        ({"a": "a dog"}, {"a": "x"}, "references of id 'a' must be a list of strings"),
        ({"a": ["x", None]}, {"a": "x"}, "references of id 'a' must all be strings"),
        ({"a": ["x"]}, {"a": ["x"]}, "prediction of id 'a' must be one string, got list"),
        ({}, {}, "no ids to score"),
        ([["x"]], {0: "x"}, "must be dicts keyed by id"),
    ],
)
def test_rejects_bad_inputs(references, predictions, message):
    with pytest.raises(ValueError, match=message):
        cider_d(references, predictions)
