"""Writes ``fixtures/cider_golden.json``: CIDEr-D from pycocoevalcap 1.2 on fixed inputs.

The file holds raw references and predictions, pycocoevalcap's tokenization of them, its
corpus CIDEr-D and its per-id scores; ``test_cider.py`` compares ``cider_d`` (and the PTB
tokenizer) with them to 1e-6 without needing Java. Regenerate (needs java and the dev
extra's pycocoevalcap) from the repository root with::

    .venv/bin/python tests/evaluation/make_cider_golden.py

The inputs are deterministic (seeded), so the file only changes if pycocoevalcap does.
``build_examples`` and ``reference_cider`` are also used by the live test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

FIXTURE = Path(__file__).with_name("fixtures") / "cider_golden.json"

SUBJECTS = [
    "a man", "a woman", "two dogs", "a cat", "a group of people", "a young boy", "an elephant",
    "a red bus", "three zebras", "a little girl", "a baseball player", "a giraffe",
]  # fmt: skip
ACTIONS = [
    "is standing on", "sitting on", "riding", "holding", "eating", "walking across",
    "playing with", "looking at", "is flying", "jumping over", "parked next to", "near",
]  # fmt: skip
OBJECTS = [
    "a surfboard", "a frisbee", "an umbrella", "the street", "a pizza", "a tennis racket",
    "a kite", "the grass", "a wooden bench", "a t-shirt", "a sandwich", "the train",
]  # fmt: skip
PLACES = [
    "on the beach", "in a kitchen", "near a building", "in the snow", "next to a table",
    "at the park", "in a field", "on a city street", "at night", "", "", "",
]  # fmt: skip
QUIRKS = [
    "it's sunny", "(in the background)", "don't know", "two-story", "with 3 dogs",
    "in the U.S.", "Mr. Smith's", "a 1/2 slice", "\"stop\" sign", "etc.", "at 5 p.m.",
    "a 10-year-old", "caf\u00e9", "...", "!!", "can't", "x-ray", "$5", "50%", "&",
]  # fmt: skip


def _caption(rng: random.Random) -> str:
    """One COCO-like caption with random case, punctuation and quirks."""
    words = [rng.choice(SUBJECTS), rng.choice(ACTIONS), rng.choice(OBJECTS), rng.choice(PLACES)]
    if rng.random() < 0.35:
        words.insert(rng.randrange(1, len(words) + 1), rng.choice(QUIRKS))
    text = " ".join(w for w in words if w)
    if rng.random() < 0.6:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.1:
        text = text.upper()
    return text + rng.choice([".", ".", "", " .", "!", "  ", ","])


def build_examples(count: int, seed: int) -> tuple:
    """(references, predictions): ``count`` ids with 1-5 references and one prediction."""
    rng = random.Random(seed)
    references, predictions = {}, {}
    for index in range(count):
        key = f"img{index:04d}"
        references[key] = [_caption(rng) for _ in range(rng.randint(1, 5))]
        roll = rng.random()
        if roll < 0.1:
            predictions[key] = rng.choice(references[key])
        elif roll < 0.15:
            predictions[key] = rng.choice(["", ".", "dog", "A", "a\nman riding a horse"])
        else:
            predictions[key] = _caption(rng)
    return references, predictions


def reference_unavailable() -> Optional[str]:
    """Why pycocoevalcap's Java tokenizer cannot run here, or None when it can."""
    spec = importlib.util.find_spec("pycocoevalcap")
    if spec is None or not spec.submodule_search_locations:
        return "pycocoevalcap is not installed"
    if shutil.which("java") is None:
        return "java is not installed"
    tokenizer_dir = Path(list(spec.submodule_search_locations)[0]) / "tokenizer"
    if not os.access(tokenizer_dir, os.W_OK):  # it writes its input file next to the jar
        return f"{tokenizer_dir} is not writable"
    return None


def reference_cider(references: dict, predictions: dict) -> dict:
    """pycocoevalcap's tokenization and CIDEr-D, called as the COCO caption evaluation does."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in references})
    score, scores = Cider().compute_score(gts, res)
    return {
        "tokenized_references": gts,
        "tokenized_predictions": {k: v[0] for k, v in res.items()},
        "score": float(score),
        "per_id": {k: float(s) for k, s in zip(references, scores)},
    }


def main() -> None:
    references, predictions = build_examples(60, seed=2024)
    golden = {
        "generator": "tests/evaluation/make_cider_golden.py (seed 2024, 60 ids)",
        "reference": "pycocoevalcap 1.2: PTBTokenizer (Stanford CoreNLP 3.4.1) + Cider",
        "references": references,
        "predictions": predictions,
        **reference_cider(references, predictions),
    }
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
    sys.stdout.write(f"wrote {FIXTURE} (CIDEr-D {golden['score']:.6f})\n")


if __name__ == "__main__":
    main()
