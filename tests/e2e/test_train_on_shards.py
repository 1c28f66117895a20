"""End-to-end: corpora built with ``mm1 data`` train the debug model.

The fixtures write small COCO, LLaVA, interleaved-JSONL and text-JSONL corpora; ``mm1 data``
turns them into shards, a sentencepiece tokenizer and an indexed text dataset; training
runs on them (single process), and on a shard full of bad samples with two DP ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.data.corpus_fixtures import (
    make_coco,
    make_energon_captions,
    make_interleaved,
    make_llava,
    make_text_jsonl,
    write_bad_caption_corpus,
)
from tests.in_process import CommandResult, run_main, train_in_process
from tests.rank_pool import train_on_pool

REPO = Path(__file__).resolve().parents[2]
NUM_STEPS = 3


def _tool(*args) -> CommandResult:
    """``mm1 data ARGS``, its ``main`` in this process (``tests/in_process.py``)."""
    from mm1_megatron.data.cli import main

    progress = ["--no-progress"] if args[0] != "tokenizer" else []
    return run_main(main, [*map(str, args), *progress])


def _wait(*results: CommandResult):
    for result in results:
        assert result.returncode == 0, result.log[-3000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    captions, coco_images = make_coco(root / "coco", 24)
    llava, llava_images = make_llava(root / "llava", 8)
    jsonl, doc_images, urls = make_interleaved(root / "docs", 8)
    text = make_text_jsonl(root / "text", 120)
    out = root / "built"
    make_energon_captions(out / "energon", shards=2, per_shard=6)
    _wait(
        _tool(
            "shards",
            "coco",
            captions,
            "--images",
            coco_images,
            "--output",
            out / "coco",
            "--samples-per-shard",
            10,
        ),
        _tool(
            "shards",
            "llava",
            llava,
            "--images",
            llava_images,
            "--output",
            out / "llava",
            "--samples-per-shard",
            4,
        ),
        _tool(
            "shards",
            "interleaved",
            jsonl,
            "--images",
            doc_images,
            "--url-map",
            urls,
            "--output",
            out / "docs",
            "--samples-per-shard",
            3,
        ),
        _tool(
            "tokenizer",
            text,
            jsonl,
            "--vocab-size",
            200,
            "--output",
            out / "tok" / "sp",
        ),
    )
    _wait(
        _tool(
            "text-index",
            text,
            "--tokenizer",
            "sentencepiece",
            "--tokenizer-path",
            out / "tok" / "sp.model",
            "--output",
            out / "text" / "corpus",
        )
    )
    return out


def _data_overrides(out: Path):
    return [
        "data.source=webdataset",
        f"data.shards.caption=[{out / 'coco'}, {out / 'llava'}, {out / 'energon'}]",
        f"data.shards.interleaved=[{out / 'docs'}]",
        f"data.shards.text=[{out / 'text' / 'corpus'}]",
        "data.tokenizer.kind=sentencepiece",
        f"data.tokenizer.path={out / 'tok' / 'sp.model'}",
    ]


def _train(output_dir: Path, *overrides, nproc: int = 1):
    """``mm1 train``: in this process for one rank, on the session's rank pool for more
    (as torchrun runs it)."""
    common = (
        f"logging.output_dir={output_dir}",
        f"training.train_steps={NUM_STEPS}",
        "logging.log_interval=1",
    )
    if nproc == 1:
        return train_in_process(*common, *overrides)
    return train_on_pool(*common, *overrides, nproc=nproc)


def _metrics(output_dir: Path):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_debug_model_trains_on_tool_built_corpora(built, tmp_path):
    result = _train(tmp_path, *_data_overrides(built), "data.num_workers=1")
    assert result.returncode == 0, result.log[-4000:]
    steps = _metrics(tmp_path)
    assert len(steps) == NUM_STEPS and all(s["loss"] is not None for s in steps)
    assert sum(s["num_images"] for s in steps) > 0


def test_mm1_sized_sequences_from_tool_built_corpora(built):
    """MM1's limits (4096 tokens, 16 images of 144 tokens) on the same corpora."""
    from mm1_megatron.batch.contract import document_causal_mask
    from mm1_megatron.config.schema import DataConfig, ShardsConfig, TokenizerConfig
    from mm1_megatron.data.build import build_data

    shards = ShardsConfig(
        caption=[str(built / "coco"), str(built / "llava")],
        interleaved=[str(built / "docs")],
        text=[str(built / "text" / "corpus")],
    )
    tokenizer = TokenizerConfig(kind="sentencepiece", path=str(built / "tok" / "sp.model"))
    cfg = DataConfig(source="webdataset", shards=shards, tokenizer=tokenizer)
    loader, tok = build_data(
        cfg,
        seq_length=4096,
        micro_batch_size=1,
        num_image_tokens=144,
        image_size=28,
        image_mean=[0.5] * 3,
        image_std=[0.25] * 3,
        seed=0,
        dp_rank=0,
        dp_size=1,
    )
    sources = [loader.builder.source_of(g) for g in range(2000)]
    for name, share in {"caption": 0.45, "interleaved": 0.45, "text": 0.10}.items():
        assert abs(sources.count(name) / 2000 - share) < 0.01, name  # exact per 1000
    seen = set()
    for step in range(8):
        batch = next(loader)
        tokens, docs = batch["tokens"][0], batch["document_ids"][0]
        assert tokens.shape == (4096,) and int(batch["num_images"][0]) <= 16
        assert int((tokens == tok.image_token_id).sum()) == 144 * int(batch["num_images"][0])
        i, j = torch.meshgrid(torch.arange(4096), torch.arange(4096), indexing="ij")
        allowed = (j <= i) & (docs[:, None] == docs[None, :])
        assert torch.equal(document_causal_mask(docs[None])[0, 0], ~allowed)
        targets = batch["labels"][0][batch["loss_mask"][0].bool()]
        assert not ((targets == tok.image_token_id) | (targets == tok.pad_token_id)).any()
        seen.add(sources[step])
        assert (
            int(batch["source_ids"][0])
            == {"caption": 0, "interleaved": 1, "text": 2}[sources[step]]
        )
    assert seen == {"caption", "interleaved", "text"}


def test_bad_samples_are_skipped_and_two_dp_ranks_keep_training(tmp_path):
    manifest, expected = write_bad_caption_corpus(tmp_path / "bad")
    result = _train(
        tmp_path / "run",
        "data.source=webdataset",
        "data.mixture={caption: 1.0}",
        f"data.shards.caption=[{manifest}]",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(_metrics(tmp_path / "run")) == NUM_STEPS
    skipped = [line for line in result.stderr.splitlines() if "skipping sample" in line]
    for reason in expected:
        assert any(reason in line and ".tar" in line for line in skipped), reason
    for rank in (0, 1):
        assert any(f"[rank {rank}]" in line for line in skipped), rank
    # The counts reach the metrics (and TensorBoard), summed over both DP ranks.
    final = _metrics(tmp_path / "run")[-1]
    for reason in expected:
        assert final[f"data/skipped/{reason}"] >= 1, reason
    assert final["data/skipped"] >= len(expected)
    assert 0 < final["data/packing_efficiency"] <= 1
