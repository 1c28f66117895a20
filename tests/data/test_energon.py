"""Megatron-Energon datasets both ways.

Read: datasets that ``energon prepare`` (the real CLI, non-interactive) prepared from
plain WebDataset tars give our loader exactly their samples (caption pairs, VQA samples as
one-turn conversations, interleaved documents through a dataset's own sample loader).
Write: the sidecar our tools write makes energon's own loader yield the same samples our
reader reads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mm1_megatron.data.pipeline.sources import ShardCorpus
from mm1_megatron.data.shards.energon import expand_braces, load_source_manifest
from mm1_megatron.data.shards.energon_meta import write_energon_meta
from mm1_megatron.data.shards.ingest import coco_items
from mm1_megatron.data.shards.records import ImageRef
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.shards.writer import build_shards
from tests.data.corpus_fixtures import (
    energon_prepare,
    image_bytes,
    make_coco,
    make_energon_captions,
    write_tar,
)

energon = pytest.importorskip("megatron.energon")

# Energon's own `energon prepare` runs as a command: the slow tier.
pytestmark = pytest.mark.slow


def _samples(folder: Path, kind: str, allow_dataset_code: bool = False):
    """Every sample of the dataset through our corpus, in shard order."""
    manifest = load_source_manifest(folder, kind, allow_dataset_code=allow_dataset_code)
    corpus = ShardCorpus([manifest], seed=0, stream=0)
    for shard, size in zip(corpus.shard_paths, corpus.shard_sizes):
        for number in range(int(size)):
            sample = corpus.reader.sample(shard, number)
            yield corpus, shard, sample


def _decode(data: bytes) -> torch.Tensor:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels / 255.0).permute(2, 0, 1)


def test_expand_braces():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/s-{1..2}.tar") == [
        "x/s-1.tar",
        "x/s-2.tar",
        "y/s-1.tar",
        "y/s-2.tar",
    ]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.fixture(scope="module")
def prepared_captions(tmp_path_factory):
    """Two tars of jpg + txt pairs, prepared by energon as CaptioningSamples."""
    folder = tmp_path_factory.mktemp("energon_captions")
    return folder, make_energon_captions(folder, shards=2, per_shard=5)


def test_energon_prepared_captions_read_as_caption_pairs(prepared_captions):
    folder, expected = prepared_captions
    seen = {}
    for corpus, shard, sample in _samples(folder, "caption"):
        sizes = {ext: size for ext, (_, size) in sample.members.items()}
        segments = corpus.formats[shard].segments(sizes, corpus.reader_of(shard, sample))
        assert segments == [ImageRef("jpg"), expected[sample.key][1]]
        seen[sample.key] = corpus.reader.read(shard, sample.members["jpg"])
    assert seen == {key: data for key, (data, _) in expected.items()}


def test_energon_dataset_trains_through_our_loader(prepared_captions):
    """The mixture's caption source packs the energon samples' captions, images decoded."""
    from mm1_megatron.config.schema import DataConfig, ShardsConfig
    from mm1_megatron.data.build import build_data

    folder, expected = prepared_captions
    mixture = {"caption": 1.0, "interleaved": 0.0, "text": 0.0, "conversation": 0.0}
    cfg = DataConfig(
        source="webdataset", shards=ShardsConfig(caption=[str(folder)]), mixture=mixture
    )
    loader, tokenizer = build_data(
        cfg,
        seq_length=128,
        micro_batch_size=1,
        num_image_tokens=4,
        image_size=28,
        image_mean=[0.5] * 3,
        image_std=[0.25] * 3,
        seed=0,
        dp_rank=0,
        dp_size=1,
    )
    captions = {tuple(tokenizer.encode(caption)) for _, caption in expected.values()}
    found = 0
    for _ in range(3):
        batch = next(loader)
        tokens, documents = batch["tokens"][0], batch["document_ids"][0]
        assert int(batch["num_images"][0]) >= 1
        for document in documents.unique().tolist():
            ids = tokens[documents == document].tolist()
            text = [t for t in ids if t not in (tokenizer.image_token_id, tokenizer.bos_token_id)]
            if text and text[-1] == tokenizer.eos_token_id:
                assert tuple(text[:-1]) in captions
                found += 1
    assert found >= 3


def test_energon_vqa_samples_become_one_turn_conversations(tmp_path):
    rng = np.random.default_rng(1)
    data, _ = image_bytes(rng)
    record = {"question": "how many shapes ?", "answers": ["two", "three"], "weights": [0.3, 0.7]}
    write_tar(tmp_path / "vqa-0.tar", [("q0", {"jpg": data, "json": json.dumps(record).encode()})])
    field_map = {
        "image": "jpg",
        "context": "json[question]",
        "answers": "json[answers]",
        "answer_weights": "json[weights]",
    }
    energon_prepare(tmp_path, "VQASample", field_map)
    ((corpus, shard, sample),) = list(_samples(tmp_path, "conversation"))
    assert corpus.conversation_record(shard, sample) == {
        "conversations": [
            {"from": "human", "value": "<image>\nhow many shapes ?"},
            {"from": "gpt", "value": "three"},  # the answer with the larger weight
        ],
        "image": ["jpg"],
    }
    with pytest.raises(ValueError, match="configured as a 'caption' source"):
        load_source_manifest(tmp_path, "caption")


SAMPLE_LOADER = """
import json

def sample_loader(raw):
    order = raw["json"]["order"]
    sequence = [raw[p] if p.endswith(".png") else p for p in order]
    return dict(__key__=raw["__key__"], sequence=sequence)

def part_filter(part):
    return True
"""


def test_energon_sample_loader_builds_interleaved_documents(tmp_path):
    rng = np.random.default_rng(2)
    first, _ = image_bytes(rng, "PNG")
    second, _ = image_bytes(rng, "PNG")
    order = {"order": ["here is", "0.png", "and", "1.png", "too ."]}
    members = {"0.png": first, "1.png": second, "json": json.dumps(order).encode()}
    write_tar(tmp_path / "docs-0.tar", [("d0", members)])
    energon_prepare(tmp_path, "InterleavedSample")  # writes a sample-loader template
    (tmp_path / ".nv-meta" / "sample_loader.py").write_text(SAMPLE_LOADER)
    with pytest.raises(ValueError, match="data.allow_dataset_code=true"):
        load_source_manifest(tmp_path, "interleaved")  # dataset code is off by default
    ((corpus, shard, sample),) = list(_samples(tmp_path, "interleaved", True))
    sizes = {ext: size for ext, (_, size) in sample.members.items()}
    segments = corpus.formats[shard].segments(sizes, corpus.reader_of(shard, sample))
    assert segments == ["here is", ImageRef("0.png"), "and", ImageRef("1.png"), "too ."]


def test_split_exclusions_are_honoured(prepared_captions, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(prepared_captions[0], folder)
    split = folder / ".nv-meta" / "split.yaml"
    split.write_text("split_parts:\n  train:\n  - part-{00..01}.tar\nexclude:\n- part-01.tar/3\n")
    manifest = load_source_manifest(folder, "caption")
    assert manifest.shard_sizes == [5, 5]
    corpus = ShardCorpus([manifest], seed=0, stream=0)
    excluded = [p for p in range(10) if corpus.locate(p) == (str(folder / "part-01.tar"), 3)]
    with pytest.raises(BadSample, match="excluded"):
        corpus.open(excluded[0])
    split.write_text(
        "split_parts:\n  train:\n  - part-00.tar\n  - part-01.tar\nexclude:\n- part-00.tar\n"
    )
    assert load_source_manifest(folder, "caption").shard_sizes == [5]
    with pytest.raises(ValueError, match="no 'val' part"):
        load_source_manifest(f"{folder}#val", "caption")


def _energon_samples(folder: Path, task_encoder=None):
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    dataset = get_train_dataset(
        str(folder),
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        worker_config=config,
        repeat=False,
        **({} if task_encoder is None else {"task_encoder": task_encoder}),
    )
    return list(get_loader(dataset))


def _interleaved_task_encoder():
    """The cooker docs/data.md shows: our segments record -> an ``InterleavedSample``."""
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        InterleavedSample,
        basic_sample_keys,
        stateless,
    )

    @stateless
    def cook(raw: dict) -> InterleavedSample:
        segments = raw["json"]["segments"]
        sequence = [raw[s["image"]] if "image" in s else s["text"] for s in segments]
        return InterleavedSample(**basic_sample_keys(raw), sequence=sequence)

    class Encoder(DefaultTaskEncoder):
        cookers = [Cooker(cook, has_subflavors={"mm1_megatron_kind": "interleaved"})]

    return Encoder()


def test_energon_opens_caption_shards_built_by_our_tools(tmp_path):
    captions, images = make_coco(tmp_path / "coco", 12)
    build_shards(
        coco_items(captions, images),
        tmp_path / "shards",
        kind="caption",
        samples_per_shard=5,
        input_id="energon-test",
        progress=False,
    )
    write_energon_meta(tmp_path / "shards")
    ours = {}
    for corpus, shard, sample in _samples(tmp_path / "shards", "caption"):
        sizes = {ext: size for ext, (_, size) in sample.members.items()}
        image, caption = corpus.formats[shard].segments(sizes, corpus.reader_of(shard, sample))
        ours[sample.key] = (corpus.reader.read(shard, sample.members[image.extension]), caption)
    theirs = _energon_samples(tmp_path / "shards")
    assert sorted(s.__key__ for s in theirs) == sorted(ours) and len(ours) == 12
    for sample in theirs:
        data, caption = ours[sample.__key__]
        assert type(sample).__name__ == "CaptioningSample" and sample.caption == caption
        assert torch.equal(sample.image, _decode(data))


def test_energon_cooks_interleaved_shards_built_by_our_tools(tmp_path):
    rng = np.random.default_rng(3)
    items = []
    for number in range(4):
        first, second = tmp_path / f"{number}a.jpg", tmp_path / f"{number}b.png"
        first.write_bytes(image_bytes(rng)[0])
        second.write_bytes(image_bytes(rng, "PNG")[0])
        from mm1_megatron.data.shards.writer import ImageFile

        items.append(["look", ImageFile(first), "then", ImageFile(second), f"end {number}"])
    build_shards(
        items,
        tmp_path / "docs",
        kind="interleaved",
        samples_per_shard=3,
        input_id="x",
        progress=False,
    )
    write_energon_meta(tmp_path / "docs")
    ours = {}
    for corpus, shard, sample in _samples(tmp_path / "docs", "interleaved"):
        read = corpus.reader_of(shard, sample)
        sizes = {ext: size for ext, (_, size) in sample.members.items()}
        members = {ext: read(ext) for ext in sample.members}
        ours[sample.key] = (corpus.formats[shard].segments(sizes, read), members)
    theirs = _energon_samples(tmp_path / "docs", _interleaved_task_encoder())
    assert sorted(s.__key__ for s in theirs) == sorted(ours) and len(ours) == 4
    for sample in theirs:
        segments, members = ours[sample.__key__]
        assert len(sample.sequence) == len(segments) == 5
        for theirs_item, segment in zip(sample.sequence, segments):
            if isinstance(segment, ImageRef):
                assert torch.equal(theirs_item, _decode(members[segment.extension]))
            else:
                assert theirs_item == segment
