"""Preference shards for DPO: preference JSON -> ``mm1 data shards preferences`` (bad
records skipped with their reason) -> the training loader, where each pair packs as two
documents (``2k`` chosen, ``2k + 1`` rejected) with the same prompt and images and labels
on the last answer only, as the DPO loss reads them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mm1_megatron.data.shards.preference_records import (
    last_answer_only,
    parse_preference_record,
)
from mm1_megatron.data.shards.reader import load_manifest
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.data.corpus_fixtures import image_bytes

REPO = Path(__file__).resolve().parents[2]
TOK = SyntheticTokenizer()
IMAGE_TOKENS = 4  # configs/debug.yaml's model.connector.num_output_tokens


def _turn(role, text):
    return {"from": role, "value": text}


def _pair(prompt, chosen="yes .", rejected="no .", **extra):
    return {"conversations": prompt, "chosen": chosen, "rejected": rejected, **extra}


ONE_TURN = [_turn("human", "<image> is there a red circle ?")]
MULTI_TURN = [
    _turn("human", "<image> how many shapes ?"),
    _turn("gpt", "there are two shapes ."),
    _turn("human", "what is at the top left ?"),
]
GOOD = [
    _pair(ONE_TURN, image="a.jpg"),
    _pair(MULTI_TURN, "a red circle .", _turn("gpt", "a blue square ."), image="b.png"),
    _pair([_turn("human", "<image> <image> where is the red circle ?")],
          "at the top left .", "at the center .", image=["a.jpg", "b.png"]),
]  # fmt: skip
BAD = {
    "ends_with_answer": _pair([*ONE_TURN, _turn("gpt", "yes .")], image="a.jpg"),
    "same_answers": _pair(ONE_TURN, "yes .", "yes .", image="a.jpg"),
    "same_but_spaces": _pair(ONE_TURN, "yes .", " yes  . ", image="a.jpg"),
    "no_rejected": {"conversations": ONE_TURN, "chosen": "yes .", "image": "a.jpg"},
    "marker_in_answer": _pair(ONE_TURN, "<image> yes .", image="a.jpg"),
    "no_prompt": _pair([], image="a.jpg"),
    "markers": _pair(ONE_TURN, image=["a.jpg", "b.png"]),
    "answer_is_a_user_turn": _pair(ONE_TURN, _turn("human", "yes ."), image="a.jpg"),
}


def test_a_record_becomes_two_conversations_that_differ_in_the_last_answer():
    chosen, rejected = parse_preference_record({**GOOD[1], "image": ["0.png"]})
    assert chosen.turns[:-1] == rejected.turns[:-1] and len(chosen.turns) == 4
    assert (chosen.turns[-1].role, chosen.turns[-1].text) == ("assistant", "a red circle .")
    assert rejected.turns[-1].text == "a blue square ."
    assert chosen.images == rejected.images == ("0.png",)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_record_is_a_bad_record(name):
    record = dict(BAD[name])
    images = record.get("image", [])
    record["image"] = [images] if isinstance(images, str) else images
    with pytest.raises(BadSample) as info:
        parse_preference_record(record)
    assert info.value.reason == "bad_record"


def test_only_the_last_run_of_targets_is_kept():
    flags = [False, True, True, False, False, True, True, True, False]
    assert last_answer_only(flags) == [False] * 5 + [True] * 3 + [False]


def _corpus(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.jpg", "b.png"):
        data, _ = image_bytes(rng, "PNG" if name.endswith("png") else "JPEG")
        (images / name).write_bytes(data)
    path = tmp_path / "preferences.json"
    path.write_text(json.dumps([*GOOD, *BAD.values()]))
    return path, images


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from mm1_megatron.data import cli

    tmp_path = tmp_path_factory.mktemp("preference_shards")
    path, images = _corpus(tmp_path)
    out = tmp_path / "shards"
    setup_logging, cli.setup_logging = cli.setup_logging, lambda: None  # keep pytest's logs
    try:
        code = cli.main(
            ["shards", "preferences", str(path), "--images", str(images),
             "--output", str(out), "--no-progress", "--samples-per-shard", "2"]
        )  # fmt: skip
    finally:
        cli.setup_logging = setup_logging
    assert code == 0
    return out


def test_the_cli_writes_the_good_pairs_and_skips_the_bad(shards):
    manifest = load_manifest(shards, kind="preference")
    assert sum(manifest.shard_sizes) == len(GOOD)
    assert (shards / ".nv-meta" / "dataset.yaml").is_file()


def _loader(shards, *overrides):
    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.data.build import build_run_data

    cfg = validate_config(
        load_config(
            REPO / "configs/debug.yaml",
            [
                "training.objective=preference",
                "data.source=webdataset",
                "data.mixture={preference: 1.0, caption: 0, interleaved: 0, text: 0}",
                f"data.shards.preference=[{shards}]",
                "training.micro_batch_size=4",
                *overrides,
            ],
        )
    )
    return build_run_data(cfg)[0]


def _documents(batch, row):
    """Per document of a row: (tokens, labelled tokens, its images)."""
    real = int(batch["num_real_tokens"][row])
    tokens, docs = batch["tokens"][row][:real], batch["document_ids"][row][:real]
    labels, mask = batch["labels"][row][:real], batch["loss_mask"][row][:real].bool()
    first = int(batch["num_images"][:row].sum())
    image_rows = iter(batch["images"][first:])
    out = []
    for doc in range(int(docs.max()) + 1):
        where = docs == doc
        count = int((tokens[where] == TOK.image_token_id).sum()) // IMAGE_TOKENS
        labelled = labels[where & mask]
        out.append((tokens[where], labelled, [next(image_rows) for _ in range(count)]))
    return out


def test_each_pair_packs_as_chosen_then_rejected_with_the_same_prompt_and_images(shards):
    from mm1_megatron.training.preference import pair_logps

    batch = next(iter(_loader(shards)))
    answers = {
        g["chosen"] if isinstance(g["chosen"], str) else g["chosen"]["value"]: g for g in GOOD
    }
    seen = 0
    for row in range(batch["tokens"].shape[0]):
        documents = _documents(batch, row)
        assert len(documents) % 2 == 0
        for chosen, rejected in zip(documents[0::2], documents[1::2]):
            chosen_answer = TOK.decode(chosen[1].tolist()).replace("<end_turn>", "").strip()
            record = answers[chosen_answer]  # the label is exactly the chosen answer
            wrong = record["rejected"]
            wrong = wrong if isinstance(wrong, str) else wrong["value"]
            assert TOK.decode(rejected[1].tolist()).replace("<end_turn>", "").strip() == wrong
            # The same tokens up to the answer (the prompt), the same pixels.
            prompt = len(chosen[0]) - len(chosen[1]) - 1
            assert torch.equal(chosen[0][:prompt], rejected[0][:prompt])
            assert len(chosen[2]) == len(rejected[2]) >= 1
            assert all(torch.equal(a, b) for a, b in zip(chosen[2], rejected[2]))
            seen += 1
    assert seen >= 3
    per_token = torch.ones_like(batch["loss_mask"])  # each answer's logp: minus its length
    chosen, rejected = pair_logps(-per_token, batch)
    assert chosen.numel() == seen


def test_a_pair_that_cannot_fit_is_skipped_not_cut(shards):
    from mm1_megatron.data.pipeline.loader import stats_vector
    from mm1_megatron.data.shards.skips import STAT_NAMES

    # At most 3 images: the two-image pair (counted for both answers: 4) never fits.
    loader = _loader(shards, "data.max_images_per_sequence=3")
    batch = next(iter(loader))
    counts = dict(zip(STAT_NAMES, stats_vector(loader)))
    assert counts["too_long"] >= 1
    for row in range(batch["tokens"].shape[0]):
        documents = _documents(batch, row)
        assert len(documents) % 2 == 0 and all(len(d[2]) == 1 for d in documents)


def test_a_preference_folder_read_as_another_kind_is_refused(shards, tmp_path):
    """Without its manifest the folder is read through its energon sidecar, which names
    the kind it was written as."""
    import shutil

    from mm1_megatron.data.shards.energon import load_source_manifest

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    (copy / "manifest.json").unlink()
    assert sum(load_source_manifest(copy, "preference").shard_sizes) == len(GOOD)
    with pytest.raises(ValueError, match="list it under data.shards.preference"):
        load_source_manifest(copy, "conversation")


def test_runs_without_preference_shards_keep_their_data_fingerprint():
    """The debug run's data fingerprint as recorded before preference shards existed: an
    empty ``data.shards.preference`` must not change it (a resume would warn that the
    data changed)."""
    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.data.build import build_run_data

    loader, _ = build_run_data(validate_config(load_config(REPO / "configs/debug.yaml", [])))
    assert loader.fingerprint == "cd109bdea5ecc2e1"
