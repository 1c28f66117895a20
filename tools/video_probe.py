#!/usr/bin/env python
"""Does a checkpoint read a clip's frames? Teacher-forced answers, with and without them.

On micro-batches of the checkpoint's own data config (the synthetic ``video`` source;
``--seed`` picks sequences no training run of seed 1234 reads), each clip's event answer
(``moves`` -> direction, ``turns`` -> colour, ``appears at time`` -> number) is predicted
with the whole clip before it, teacher-forced, twice:

- ``frames``: every frame as drawn;
- ``first frame only``: every frame of the clip replaced by its first one, so nothing the
  later frames show can be read.

Printed per event kind: answers, accuracy and mean answer loss (nats) each way, and the
chance accuracy (a uniform guess over the kind's answers). A model that reads the frames
scores above its first-frame-only figure; one that learned each kind's prior scores the
same both ways. The last line is one JSON object of the figures.

    python tools/video_probe.py --checkpoint runs/debug_video/ckpt --batches 20
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from mm1_megatron.batch.model_inputs import model_inputs, run_model
from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.synthetic.video import DIRECTIONS
from mm1_megatron.data.tokenizers import base as vocab
from mm1_megatron.evaluation.model import load_eval_model


def chance(kind: str, num_frames: int) -> float:
    """A uniform guess among the kind's answers: directions, the other colours, or the
    seconds 1 .. num_frames - 1 at which a shape can appear."""
    answers = {
        "move": len(DIRECTIONS),
        "turn": len(vocab.SHAPE_COLOUR_WORDS) - 1,
        "appear": num_frames - 1,
    }
    return 1 / answers[kind]


def answer_positions(tokens: List[int], words: Dict[str, int]) -> List[Tuple[str, int]]:
    """``(kind, position)``: where each clip's answer is predicted (the logits there give
    the token at ``position + 1``)."""
    found = []
    for pos, token in enumerate(tokens[:-2]):
        if token == words["moves"]:
            found.append(("move", pos))
        elif token == words["turns"]:
            found.append(("turn", pos))
        elif token == words["at"] and pos > 0 and tokens[pos - 1] == words["appears"]:
            found.append(("appear", pos + 1))  # "appears at time" -> the number
    return found


def first_frames_only(batch, image_token_id: int, tokens_per_image: int) -> torch.Tensor:
    """``batch["images"]`` with every image of a document replaced by the document's first
    one (images are in order of appearance, row by row)."""
    images = batch["images"].clone()
    index = 0
    for row, docs in zip(batch["tokens"].tolist(), batch["document_ids"].tolist()):
        first_of_doc = {}
        slots = [p for p, t in enumerate(row) if t == image_token_id][::tokens_per_image]
        for position in slots:
            first = first_of_doc.setdefault(docs[position], index)
            images[index] = batch["images"][first]
            index += 1
    assert index == images.shape[0], (index, images.shape)
    return images


def probe(checkpoint: Path, batches: int, seed: int) -> dict:
    em = load_eval_model(checkpoint)
    cfg, model, tok = em.cfg, em.model, em.tokenizer
    loader, _ = build_run_data(cfg, seed=seed)
    words = {w: tok.encode(w)[0] for w in ("moves", "turns", "at", "appears")}
    stats = defaultdict(lambda: {"n": 0, "correct": [0, 0], "loss": [0.0, 0.0]})
    stream = iter(loader)
    for _ in range(batches):
        batch = next(stream)
        if "images" not in batch:
            continue
        ablated = first_frames_only(
            batch, tok.image_token_id, cfg.model.connector.num_output_tokens
        )
        for way, images in enumerate((batch["images"], ablated)):
            inputs = model_inputs({**batch, "images": images}, em.ctx.device)
            with torch.no_grad():
                logp = run_model(model, inputs, with_labels=False).float().log_softmax(-1)
            for b, row in enumerate(batch["tokens"].tolist()):
                for kind, pos in answer_positions(row, words):
                    gold = row[pos + 1]
                    s = stats[kind]
                    s["n"] += way == 0
                    s["correct"][way] += int(logp[b, pos].argmax()) == gold
                    s["loss"][way] -= float(logp[b, pos, gold])
    out = {}
    for kind, s in sorted(stats.items()):
        n = s["n"]
        out[kind] = {
            "answers": n,
            "chance": chance(kind, cfg.data.video.num_frames),
            "accuracy_frames": s["correct"][0] / n,
            "accuracy_first_frame_only": s["correct"][1] / n,
            "loss_frames": s["loss"][0] / n,
            "loss_first_frame_only": s["loss"][1] / n,
        }
    return {"checkpoint": str(checkpoint), "step": em.step, "events": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=20, help="micro-batches to read")
    parser.add_argument("--seed", type=int, default=777, help="data seed (held out: not 1234)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = probe(args.checkpoint, args.batches, args.seed)
    print(f"{report['checkpoint']} (step {report['step']}), teacher-forced event answers:")
    print(
        f"{'event':>7} {'n':>4} {'chance':>6} {'acc frames':>10} {'acc first only':>14} "
        f"{'loss frames':>11} {'loss first only':>15}"
    )
    for kind, r in report["events"].items():
        print(
            f"{kind:>7} {r['answers']:>4} {r['chance']:6.3f} {r['accuracy_frames']:10.3f} "
            f"{r['accuracy_first_frame_only']:14.3f} {r['loss_frames']:11.3f} "
            f"{r['loss_first_frame_only']:15.3f}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
