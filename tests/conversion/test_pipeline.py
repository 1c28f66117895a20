"""An exported MM1 model in ``transformers``' ``image-text-to-text`` pipeline.

In a process where ``mm1_megatron`` and ``megatron`` cannot be imported
(``sft_transformers_side.py pipeline``), ``pipeline("image-text-to-text", model=folder,
trust_remote_code=True)`` answers, greedily, exactly as ``model.generate`` does on the
processor's output for the same prompt and images (the documented way:
``tokenizer.apply_chat_template(..., tokenize=False)``, then ``processor(text, images)``):

- the trained dense export (a pretraining run: no tiles, no chat template), plain text
  with one and with two ``<image>`` markers;
- the SFT export with static tiles, chat messages whose content parts hold one and two
  images (by path), and plain text written in the chat format by hand.

Also: ``MM1Processor`` returns a ``BatchFeature`` with and without images, which casts
its pixels with ``.to(dtype=...)`` and keeps the ids integer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.launch import clean_env

SIDE = Path(__file__).with_name("sft_transformers_side.py")

MAX_NEW_TOKENS = 4
QUESTION = "how many shapes ?"
CASES = {
    "dense_one_image": {"export": "dense", "text": "<image> a red circle and", "images": 1},
    "dense_two_images": {"export": "dense", "text": "<image> <image> there are", "images": 2},
    "sft_chat_one_image": {"export": "sft", "chat": [1]},
    "sft_chat_two_images": {"export": "sft", "chat": [1, 1]},
    "sft_plain_text": {
        "export": "sft",
        "text": f"<bos><user><image> {QUESTION}<end_turn><assistant>",
        "images": 1,
    },
}


def _write_images(folder):
    """Two PNG files of different sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(5)
    paths = []
    for index, (height, width) in enumerate([(90, 150), (64, 40)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(str(folder / f"image{index}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def _messages(images_per_turn, paths):
    """A user turn per entry of ``images_per_turn``, each with its images, then text."""
    images = iter(paths)
    messages = []
    for count in images_per_turn:
        content = [{"type": "image", "path": next(images)} for _ in range(count)]
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]})
        messages.append({"role": "assistant", "content": "two ."})
    return messages[:-1]  # the model answers the last question


def _spec_cases(paths):
    cases = []
    for name, case in CASES.items():
        spec = {"name": name, "export": case["export"]}
        if "chat" in case:
            spec["messages"] = _messages(case["chat"], paths)
        else:
            spec.update(text=case["text"], images=paths[: case["images"]])
        cases.append(spec)
    return cases


@pytest.fixture(scope="module")
def pipeline_side(trained_exports, sft_run, tmp_path_factory):
    """Runs ``sft_transformers_side.py pipeline`` on the dense and the static SFT export."""
    folder = tmp_path_factory.mktemp("pipeline")
    _, sft_exports, _ = sft_run
    exports = {"dense": trained_exports["dense_tp2"], "sft": sft_exports["static"]}
    spec = {
        "exports": {name: str(path) for name, path in exports.items()},
        "cases": _spec_cases(_write_images(folder)),
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    env = clean_env(HF_MODULES_CACHE=str(folder / "hf_modules"), HF_HUB_OFFLINE="1")
    command = [sys.executable, "-I", str(SIDE), "pipeline", "spec.json", "out.json"]
    result = subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((folder / "out.json").read_text())
    return report, {case["name"]: case for case in spec["cases"]}


def test_the_pipeline_runs_on_the_exported_code_alone(pipeline_side):
    report, _ = pipeline_side
    assert report["loaded"] == [], report["loaded"]
    assert report["classes"] and all(
        module.startswith("transformers_modules.") for module in report["classes"]
    ), report["classes"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_pipeline_answers_as_generate_does(name, pipeline_side):
    report, cases = pipeline_side
    result, case = report["cases"][name], cases[name]
    assert result["ids"] == result["reference_ids"]  # same prompt ids, same greedy tokens
    assert len(result["reference_ids"]) > result["prompt_length"]
    # The pipeline cuts the decoded prompt off the decoded whole sequence: the word-level
    # decoder leaves the space between them in front of the answer.
    assert result["new_text"].strip() == result["reference_text"].strip()
    if "messages" in case:
        answer = {"role": "assistant", "content": result["new_text"]}
        assert result["full"] == [*case["messages"], answer]
    else:
        assert result["full"] == case["text"] + result["new_text"]


def test_the_processor_returns_a_batch_feature(trained_exports, sft_run):
    from PIL import Image
    from transformers.feature_extraction_utils import BatchFeature

    import mm1_megatron.hf_model.register  # noqa: F401  registers MM1ImageProcessor
    from mm1_megatron.hf_model.processing_mm1 import MM1Processor

    _, sft_exports, _ = sft_run
    image = Image.fromarray(np.zeros((30, 50, 3), dtype=np.uint8))
    for folder, tiles in ((trained_exports["dense_tp2"], 1), (sft_exports["static"], 5)):
        processor = MM1Processor.from_pretrained(folder)
        text_only = processor(text=QUESTION, return_tensors="pt")
        assert isinstance(text_only, BatchFeature) and set(text_only) == {
            "input_ids",
            "attention_mask",
        }
        batch = processor(text=f"<image> {QUESTION}", images=[image], return_tensors="pt")
        assert isinstance(batch, BatchFeature)
        assert batch["num_tiles"].tolist() == [tiles]
        image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
        assert image_tokens == tiles * processor.num_image_tokens
        half = batch.to(dtype=torch.bfloat16)
        assert half["pixel_values"].dtype == torch.bfloat16
        assert half["input_ids"].dtype == torch.int64
        lists = processor(text=[QUESTION])
        assert isinstance(lists, BatchFeature) and isinstance(lists["input_ids"], list)
