"""CIDEr-D, computed as pycocoevalcap's ``Cider().compute_score`` computes it.

The standard COCO caption evaluation tokenizes the references and the predictions with
its PTB tokenizer (two calls, ids in the references' order), then scores each id:

* n-grams for n = 1..4 of the whitespace-split tokens, counted per sentence;
* document frequency ``df(g)``: the number of ids whose references contain ``g``, taken
  from the references of the evaluated set only, and ``log N`` with N the number of ids;
* each sentence becomes, per n, a vector of ``tf(g) * (log N - log max(1, df(g)))`` with
  its Euclidean norm; its "length" is, as in the reference code, its number of bigrams;
* against each reference: per n, the clipped dot product ``sum min(h_g, r_g) * r_g`` over
  the prediction's n-grams, divided by the two norms when both are non-zero, times the
  length penalty ``exp(-(len_h - len_r)^2 / (2 * 6^2))``;
* an id's score is the mean over n, summed over its references, divided by their number,
  times 10; the corpus score is the mean over ids (same scale as the reference, not x100).

Where the reference fails (every reference empty after tokenizing: ``max()`` of no
document frequencies) this returns zeros. With a single id, ``log N = 0`` makes every
weight zero, so CIDEr-D is 0 there as in the reference.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Dict, Hashable, List, Tuple

from mm1_megatron.evaluation.metrics.ptb_tokenizer import ptb_tokenize_batch

logger = logging.getLogger(__name__)

MAX_N = 4
SIGMA = 6.0

NGramCounts = Counter
Vector = Tuple[List[Dict[tuple, float]], List[float], int]


def _validate(references: Mapping, predictions: Mapping) -> None:
    """Same ids on both sides, a non-empty list of strings and one string per id."""
    if not isinstance(references, Mapping) or not isinstance(predictions, Mapping):
        raise ValueError("references and predictions must be dicts keyed by id")
    if not references:
        raise ValueError("no ids to score: references is empty")
    for key in references:
        if key not in predictions:
            raise ValueError(f"id {key!r} has references but no prediction")
    for key in predictions:
        if key not in references:
            raise ValueError(f"id {key!r} has a prediction but no references")
    for key, refs in references.items():
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(f"references of id {key!r} must be a list of strings")
        if not refs:
            raise ValueError(f"id {key!r} has an empty list of references")
        if not all(isinstance(ref, str) for ref in refs):
            raise ValueError(f"references of id {key!r} must all be strings")
    for key, prediction in predictions.items():
        if not isinstance(prediction, str):
            raise ValueError(
                f"prediction of id {key!r} must be one string, got {type(prediction).__name__}"
            )


def _ngrams(tokens: Sequence[str]) -> NGramCounts:
    """Counts of the 1- to 4-grams of a sentence, split on whitespace as the reference does."""
    words = " ".join(tokens).split()  # a no-break space inside a PTB token splits here too
    counts: NGramCounts = Counter()
    for n in range(1, MAX_N + 1):
        for start in range(len(words) - n + 1):
            counts[tuple(words[start : start + n])] += 1
    return counts


def _document_frequency(refs_per_id: List[List[NGramCounts]]) -> Counter:
    df: Counter = Counter()
    for refs in refs_per_id:
        df.update({gram for counts in refs for gram in counts})
    return df


def _tfidf(counts: NGramCounts, df: Counter, log_n: float) -> Vector:
    """Per-n tf-idf vectors, their norms and the reference's length (the bigram count)."""
    vectors: List[Dict[tuple, float]] = [{} for _ in range(MAX_N)]
    squares = [0.0] * MAX_N
    bigrams = 0
    for gram, tf in counts.items():
        n = len(gram) - 1
        weight = float(tf) * (log_n - math.log(max(1.0, float(df.get(gram, 0)))))
        vectors[n][gram] = weight
        squares[n] += weight**2
        if n == 1:
            bigrams += tf
    return vectors, [math.sqrt(s) for s in squares], bigrams


def _similarity(hyp: Vector, ref: Vector) -> List[float]:
    """Per-n clipped cosine similarity times the Gaussian length penalty."""
    (hyp_vec, hyp_norm, hyp_len), (ref_vec, ref_norm, ref_len) = hyp, ref
    penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * SIGMA**2))
    values = []
    for n in range(MAX_N):
        value = 0.0
        for gram, weight in hyp_vec[n].items():
            ref_weight = ref_vec[n].get(gram, 0.0)
            value += min(weight, ref_weight) * ref_weight
        if hyp_norm[n] != 0 and ref_norm[n] != 0:
            value /= hyp_norm[n] * ref_norm[n]
        values.append(value * penalty)
    return values


def _tokenize(
    references: Mapping, predictions: Mapping, ids: List[Hashable]
) -> Tuple[List[List[NGramCounts]], List[NGramCounts]]:
    """Two tokenizer calls in the references' id order, as the COCO evaluation makes them."""
    flat = ptb_tokenize_batch([ref for key in ids for ref in references[key]])
    refs_per_id, start = [], 0
    for key in ids:
        stop = start + len(references[key])
        refs_per_id.append([_ngrams(tokens) for tokens in flat[start:stop]])
        start = stop
    hyps = [_ngrams(tokens) for tokens in ptb_tokenize_batch([predictions[k] for k in ids])]
    return refs_per_id, hyps


def cider_d(
    references: Mapping[Hashable, List[str]], predictions: Mapping[Hashable, str]
) -> Tuple[float, Dict[Hashable, float]]:
    """CIDEr-D of raw predictions against raw references: (corpus score, score per id).

    ``references`` maps each id to its reference captions, ``predictions`` each id to one
    predicted caption; both are tokenized here with :mod:`ptb_tokenizer`. Raises
    ``ValueError`` naming the offending id when the two do not pair up.
    """
    _validate(references, predictions)
    ids = list(references)
    refs_per_id, hyps = _tokenize(references, predictions, ids)
    df = _document_frequency(refs_per_id)
    if not df:
        logger.warning("every reference is empty after tokenizing; CIDEr-D is 0")
    log_n = math.log(float(len(ids)))
    per_id: Dict[Hashable, float] = {}
    for key, refs, hyp in zip(ids, refs_per_id, hyps):
        hyp_vector = _tfidf(hyp, df, log_n)
        totals = [0.0] * MAX_N
        for ref in refs:
            for n, value in enumerate(_similarity(hyp_vector, _tfidf(ref, df, log_n))):
                totals[n] += value
        per_id[key] = sum(totals) / MAX_N / len(refs) * 10.0
    return sum(per_id.values()) / len(per_id), per_id
