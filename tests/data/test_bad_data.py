"""Bad samples are skipped, counted per reason, logged with shard and key; ranks stay in step."""

import logging

import pytest
import torch

from mm1_megatron.config.schema import DataConfig, ImagePipelineConfig, ShardsConfig
from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline import sources
from mm1_megatron.data.shards.skips import SKIP_REASONS
from tests.data.corpus_fixtures import write_bad_caption_corpus

SEQ, WINDOW, NUM_SAMPLES = 256, 5, 20
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _loader(manifest, decoder="pil", dp_rank=0, dp_size=1, **kwargs):
    cfg = DataConfig(
        source="webdataset",
        shards=ShardsConfig(caption=[str(manifest)]),
        mixture={"caption": 1},
        max_images_per_sequence=WINDOW,
        caption_window=WINDOW,
        images=ImagePipelineConfig(decoder=decoder),
        **kwargs,
    )
    loader, _ = build_data(
        cfg,
        seq_length=SEQ,
        micro_batch_size=1,
        num_image_tokens=4,
        image_size=28,
        image_mean=MEAN,
        image_std=STD,
        seed=0,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return loader


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    return write_bad_caption_corpus(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_one_epoch_counts_every_bad_sample_once(bad_corpus, decoder, monkeypatch, caplog):
    manifest, expected = bad_corpus
    monkeypatch.setattr(sources, "MAX_REPLACEMENTS", 0)  # visit each sample exactly once
    loader = _loader(manifest, decoder)
    with caplog.at_level(logging.WARNING, logger="mm1_megatron.data.shards.skips"):
        batches = [next(loader) for _ in range(NUM_SAMPLES // WINDOW)]
    counts = loader.skip_counts()
    assert counts == {reason: expected.get(reason, 0) for reason in SKIP_REASONS}
    # Independent check: 8 good samples in shard 0 and 2 in shard 1 made it into batches.
    num_documents = sum(int(b["document_ids"].max()) for b in batches)  # padding is +1
    assert num_documents == 10
    assert sum(int(b["num_images"].sum()) for b in batches) == 10
    logged = [r.getMessage() for r in caplog.records if r.name == "mm1_megatron.data.shards.skips"]
    assert len(logged) == sum(expected.values())
    for key in (
        "bad_corrupt",
        "bad_truncated_jpeg",
        "bad_empty_image",
        "bad_missing_image",
        "bad_utf8",
        "bad_json",
        "bad_schema",
        "bad_too_long",
    ):
        assert sum(f"'{key}'" in m and "bad-000000.tar" in m for m in logged) == 1, key
    assert sum("bad-000001.tar" in m and "truncated_tar" in m for m in logged) == 2


def test_member_names_never_become_paths(bad_corpus, tmp_path, monkeypatch):
    manifest, _ = bad_corpus
    monkeypatch.chdir(tmp_path)
    loader = _loader(manifest)
    [next(loader) for _ in range(NUM_SAMPLES // WINDOW)]
    assert list(tmp_path.iterdir()) == []
    assert not (manifest.parent.parent / "escape").exists()


def test_replacements_keep_sequences_full_and_ranks_in_step(bad_corpus):
    manifest, _ = bad_corpus
    ranks = [_loader(manifest, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(6):  # three epochs between the two ranks
        for loader in ranks:
            batch = next(loader)
            assert batch["tokens"].shape == (1, SEQ)
            assert int(batch["num_images"]) == WINDOW  # bad samples were replaced
    assert all(sum(loader.skip_counts().values()) > 0 for loader in ranks)


def test_interleaved_document_with_a_bad_image_is_replaced(tmp_path):
    import numpy as np

    from mm1_megatron.data.shards.reader import write_manifest
    from mm1_megatron.data.shards.records import record_members
    from tests.data.corpus_fixtures import image_bytes, write_tar

    rng = np.random.default_rng(0)
    good, _ = image_bytes(rng)
    bad = record_members(["here is a picture :", (b"\xff\xd8\xff" + b"\x00" * 50, "jpg")])
    fine = record_members(["here is a picture :", (good, "jpg"), "it shows a red circle ."])
    write_tar(tmp_path / "d.tar", [("doc0", bad), ("doc1", fine)])
    write_manifest(tmp_path / "manifest.json", "interleaved", [{"path": "d.tar", "num_samples": 2}])
    cfg = DataConfig(
        source="webdataset",
        shards=ShardsConfig(interleaved=[str(tmp_path)]),
        mixture={"interleaved": 1},
        max_images_per_sequence=4,
    )
    loader, _ = build_data(
        cfg,
        seq_length=64,
        micro_batch_size=1,
        num_image_tokens=4,
        image_size=28,
        image_mean=MEAN,
        image_std=STD,
        seed=0,
        dp_rank=0,
        dp_size=1,
    )
    batches = [next(loader) for _ in range(4)]
    assert all(int(b["num_images"]) == 1 for b in batches)  # every sequence got doc1
    assert loader.skip_counts()["corrupt_image"] >= 1
    assert torch.isfinite(torch.cat([b["images"] for b in batches])).all()


def test_data_metrics_sum_counts_and_packing_efficiency(bad_corpus, megatron_single_process):
    from mm1_megatron.data.pipeline.reporting import data_metrics

    manifest, expected = bad_corpus
    loader = _loader(manifest)
    batches = [next(loader) for _ in range(NUM_SAMPLES // WINDOW)]
    metrics = data_metrics(loader, batches)  # world of one: the all-reduce is the identity
    for reason, count in loader.skip_counts().items():
        assert metrics[f"data/skipped/{reason}"] == count
    assert metrics["data/skipped"] == sum(loader.skip_counts().values()) > 0
    real = sum(int((b["tokens"] != b["tokens"][0, -1]).sum()) for b in batches)  # pad = last
    assert metrics["data/packing_efficiency"] == pytest.approx(real / (len(batches) * SEQ))
