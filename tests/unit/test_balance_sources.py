"""``sequence_cost`` of the shard and text sources (``pipeline/sources.py``): the cost of
the sequence ``sequence`` builds, without decoding an image.

Every kind (captions packed several to a sequence, interleaved documents cut by length and
by image count, conversations shortened to fit, preference pairs, text chunks, the
mixture), at a fixed
image size, with dynamic tiling and at native resolution, must give
``cost_of_sequence(sequence(i)[0])`` exactly; no image decoder is called; and a sample
whose header reads but whose pixels do not decode is the documented exception.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mm1_megatron.config.schema import DataConfig, ShardsConfig, TilingConfig
from mm1_megatron.data.build import build_data
from mm1_megatron.data.pipeline.balance import cost_of_sequence
from mm1_megatron.data.pipeline.native_resolution import NativeResolution
from mm1_megatron.data.shards.ingest import (
    coco_items,
    interleaved_items,
    jsonl_texts,
    llava_conversation_items,
    load_url_map,
)
from mm1_megatron.data.shards.reader import write_manifest
from mm1_megatron.data.shards.text_index import build_text_index
from mm1_megatron.data.shards.writer import build_shards
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.data.corpus_fixtures import (
    good_caption_sample,
    make_coco,
    make_interleaved,
    make_llava,
    make_text_jsonl,
    write_tar,
)

TOK = SyntheticTokenizer()
SIZE, NUM_IMAGE_TOKENS = 28, 4
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
NATIVE = NativeResolution(patch_size=14, max_patches=16)
NUM_INDICES = 30


def _conversations(root: Path, num: int) -> tuple:
    """LLaVA JSON of 1-4 turn conversations with 0-2 images each (make_llava's images)."""
    path, images = make_llava(root, 8)
    singles = json.loads(path.read_text())
    entries = []
    for i in range(num):
        names = [singles[(i + k) % len(singles)]["image"] for k in range(i % 3)]
        answer = singles[i % len(singles)]["conversations"][1]["value"]
        turns = []
        for turn in range(1 + i % 4):
            markers = "<image> " * len(names) if turn == 0 else ""
            turns += [
                {"from": "human", "value": markers + "how many shapes ?"},
                {"from": "gpt", "value": answer},
            ]
        entries.append({"id": str(i), "image": names, "conversations": turns})
    path.write_text(json.dumps(entries))
    return path, images


def _preferences(conversations: Path) -> Path:
    """Preference JSON from those conversations: the prompt is all but the last answer,
    which is chosen over a wrong count."""
    entries = json.loads(conversations.read_text())
    for entry in entries:
        *prompt, answer = entry["conversations"]
        entry.update(conversations=prompt, chosen=answer, rejected="there are nine shapes .")
    path = conversations.with_name("preferences.json")
    path.write_text(json.dumps(entries))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("balance_corpus")
    common = dict(input_id="t", progress=False)
    captions, images = make_coco(root / "coco", 16)
    build_shards(
        coco_items(captions, images),
        root / "caption",
        kind="caption",
        samples_per_shard=5,
        **common,
    )
    jsonl, doc_images, tsv = make_interleaved(root / "docs", 8)
    build_shards(
        interleaved_items([jsonl], doc_images, url_map=load_url_map(tsv)),
        root / "interleaved",
        kind="interleaved",
        samples_per_shard=3,
        **common,
    )
    llava, llava_images = _conversations(root / "llava", 12)
    build_shards(
        llava_conversation_items(llava, llava_images),
        root / "conversation",
        kind="conversation",
        samples_per_shard=5,
        **common,
    )
    build_shards(
        llava_conversation_items(_preferences(llava), llava_images),
        root / "preference",
        kind="preference",
        samples_per_shard=5,
        **common,
    )
    text = make_text_jsonl(root / "text", 30)
    build_text_index(
        jsonl_texts([text]), root / "text" / "corpus", TOK, docs_per_part=8, progress=False
    )
    return root


def _builder(root, mixture, *, seq_length=256, max_images=4, native=None, **options):
    shards = ShardsConfig(
        caption=[str(root / "caption")],
        interleaved=[str(root / "interleaved")],
        conversation=[str(root / "conversation")],
        preference=[str(root / "preference")],
        text=[str(root / "text" / "corpus")],
    )
    data = DataConfig(
        source="webdataset",
        shards=shards,
        mixture=mixture,
        max_images_per_sequence=max_images,
        caption_window=4,
        num_workers=0,
        **options,
    )
    return _built(data, seq_length=seq_length, seed=3, native=native)


def _built(data, *, seq_length, seed, native):
    """The builder ``build_data`` makes for ``data`` (one rank, micro-batches of one)."""
    loader, _ = build_data(
        data,
        seq_length=seq_length,
        micro_batch_size=1,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_size=SIZE,
        image_mean=MEAN,
        image_std=STD,
        seed=seed,
        dp_rank=0,
        dp_size=1,
        native=native,
    )
    return loader.builder


def _check_costs(builder, indices=range(NUM_INDICES)):
    """Each index's cost (asked first) against its built sequence's; the sequences' stats."""
    costs, stats = [], Counter()
    for index in indices:
        cost = builder.sequence_cost(index)
        packed, sequence_stats = builder.sequence(index)
        assert cost == cost_of_sequence(packed), index
        costs.append(cost)
        stats.update({name: n for name, n in sequence_stats.counts.items() if n})
        stats[f"source {packed.source}"] += 1
    return costs, stats


def test_captions_packed_several_to_a_sequence(corpus):
    costs, stats = _check_costs(_builder(corpus, {"caption": 1}))
    assert max(cost.encoder_inputs for cost in costs) > 1  # several captions per sequence


@pytest.mark.parametrize("seq_length, max_images", [(40, 8), (256, 2)], ids=["length", "images"])
def test_interleaved_documents_cut_to_fit(corpus, seq_length, max_images):
    builder = _builder(corpus, {"interleaved": 1}, seq_length=seq_length, max_images=max_images)
    costs, _ = _check_costs(builder)
    whole = _builder(corpus, {"interleaved": 1}, seq_length=1024, max_images=8)
    whole_costs = [whole.sequence_cost(index) for index in range(NUM_INDICES)]
    if max_images == 2:
        assert max(c.encoder_inputs for c in whole_costs) > 2
        assert max(c.encoder_inputs for c in costs) == 2
    else:
        assert any(c.attention_pairs < w.attention_pairs for c, w in zip(costs, whole_costs))


@pytest.mark.parametrize("packing", ["packed", "one_per_sequence"])
def test_conversations_packed_and_shortened(corpus, packing):
    from mm1_megatron.config.schema import ConversationConfig

    builder = _builder(
        corpus,
        {"conversation": 1},
        seq_length=64,
        conversations=ConversationConfig(packing=packing),
    )
    _, stats = _check_costs(builder)
    assert stats["shortened_conversations"] > 0


@pytest.mark.parametrize("images", ["fixed", "tiles", "native"])
def test_preference_pairs_cost_two_documents_each(corpus, images):
    tiling = TilingConfig(mode="dynamic", tile_size=SIZE, min_tiles=1, max_tiles=4)
    options = {"tiles": dict(tiling=tiling, max_images=24), "native": dict(native=NATIVE)}
    builder = _builder(corpus, {"preference": 1}, **options.get(images, {}))
    costs, _ = _check_costs(builder)
    packed = [builder.sequence(index)[0] for index in range(NUM_INDICES)]
    assert all(int(p.document_ids[: p.num_real_tokens].max()) % 2 == 1 for p in packed)
    assert max(cost.encoder_inputs for cost in costs) > 0


def test_text_chunks(corpus):
    costs, _ = _check_costs(_builder(corpus, {"text": 1}, seq_length=64))
    assert all(cost.encoder_inputs == 0 and cost.attention_pairs > 0 for cost in costs)


def test_the_mixture_builder_dispatches_by_source(corpus):
    mixture = {"caption": 0.3, "interleaved": 0.3, "conversation": 0.2, "text": 0.2}
    costs, stats = _check_costs(_builder(corpus, mixture))
    assert sum(1 for name in stats if name.startswith("source ")) == 4
    # A pure function of the index: a fresh builder, asked in another order, agrees.
    fresh = _builder(corpus, mixture)
    assert [fresh.sequence_cost(index) for index in reversed(range(NUM_INDICES))] == costs[::-1]


def test_dynamic_tiles(corpus):
    tiling = TilingConfig(mode="dynamic", tile_size=SIZE, min_tiles=1, max_tiles=4)
    mixture = {"caption": 0.5, "interleaved": 0.3, "conversation": 0.2}
    costs, _ = _check_costs(_builder(corpus, mixture, max_images=24, tiling=tiling))
    assert max(cost.encoder_inputs for cost in costs) > 4  # images of several tiles


def test_native_resolution(corpus):
    mixture = {"caption": 0.4, "interleaved": 0.3, "conversation": 0.2, "text": 0.1}
    costs, _ = _check_costs(_builder(corpus, mixture, native=NATIVE))
    per_input = {c.patches / c.encoder_inputs for c in costs if c.encoder_inputs}
    assert len(per_input) > 1 and all(c.patch_pairs >= c.patches for c in costs)


@pytest.mark.parametrize("kind", ["fixed", "tiles", "native"])
def test_costs_never_decode_an_image(corpus, monkeypatch, kind):
    options = {
        "fixed": {},
        "tiles": dict(max_images=24, tiling=TilingConfig(mode="dynamic", tile_size=SIZE)),
        "native": dict(native=NATIVE),
    }[kind]
    mixture = {"caption": 0.4, "interleaved": 0.4, "conversation": 0.2}
    builder = _builder(corpus, mixture, **options)

    def decode(*args, **kwargs):
        raise AssertionError("sequence_cost decoded an image")

    for source in builder.sources.values():
        monkeypatch.setattr(source.decoder, "decode", decode)
        monkeypatch.setattr(source.decoder, "decode_tiles", decode)
    costs = [builder.sequence_cost(index) for index in range(NUM_INDICES)]
    assert sum(cost.encoder_inputs for cost in costs) > 0


# ---- a sample whose images fail to decode -----------------------------------------------
@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    """Short good captions, and two long ones whose images fail to decode: one with a
    header that reads (a truncated JPEG), one without (random bytes)."""
    root = tmp_path_factory.mktemp("bad_balance")
    rng = np.random.default_rng(0)
    samples = [(f"good{i:02d}", good_caption_sample(rng)) for i in range(10)]
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated = buffer.getvalue()[: len(buffer.getvalue()) * 3 // 4]  # cut inside the scan
    long_caption = " ".join(["red"] * 60).encode()  # longer than any good caption
    samples.insert(3, ("truncated", {"jpg": truncated, "txt": long_caption}))
    samples.insert(7, ("no_header", {"jpg": b"not an image", "txt": long_caption}))
    write_tar(root / "bad-000000.tar", samples)
    write_manifest(
        root / "manifest.json", "caption", [{"path": "bad-000000.tar", "num_samples": len(samples)}]
    )
    return root / "manifest.json"


def _caption_source(manifest, native):
    data = DataConfig(
        source="webdataset",
        shards=ShardsConfig(caption=[str(manifest)]),
        mixture={"caption": 1},
        max_images_per_sequence=1,
        caption_window=1,
        num_workers=0,
    )
    return _built(data, seq_length=128, seed=0, native=native).sources["caption"]


@pytest.mark.parametrize("native", [None, NATIVE], ids=["fixed", "native"])
def test_a_sample_that_fails_to_decode_may_cost_otherwise(bad_corpus, native):
    """Sequence ``k`` is sample ``k`` (a window of 1). A cost never depends on what the
    process decoded before (every rank plans with the same numbers, and so does a resumed
    process): an image that fails to decode is counted, where the built sequence has a
    replacement, before and after building it. At native resolution the header is read for
    the size: an image without one fails there already, as when built."""
    source = _caption_source(bad_corpus, native)
    corpus = source.corpus
    index_of = {corpus.describe(k)[1]: k for k in range(corpus.num_samples)}
    for key in ("truncated", "no_header"):
        index = index_of[key]
        before = source.sequence_cost(index)
        packed, stats = source.sequence(index)
        assert stats.counts["corrupt_image"] >= 1
        built = cost_of_sequence(packed)
        assert source.sequence_cost(index) == before  # a pure function of the index
        if key == "no_header" and native is not None:
            assert before == built
        else:
            assert before != built
