"""The shard/text pipeline end to end in one process: packing rules, epochs, determinism,
workers, data-parallel sharding and resuming (DP=2, and a DP change)."""

import json
from collections import Counter

import pytest
import torch

from mm1_megatron.batch.contract import document_causal_mask
from mm1_megatron.config.schema import DataConfig, ShardsConfig
from mm1_megatron.data import BATCH_KEYS, SOURCE_IDS, collate
from mm1_megatron.data.build import build_data
from mm1_megatron.data.shards.ingest import coco_items, interleaved_items, jsonl_texts, load_url_map
from mm1_megatron.data.shards.text_index import build_text_index
from mm1_megatron.data.shards.writer import build_shards
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.data.corpus_fixtures import make_coco, make_interleaved, make_text_jsonl

TOK = SyntheticTokenizer()
IMG, PAD = TOK.image_token_id, TOK.pad_token_id
SEQ, NUM_IMAGE_TOKENS, MAX_IMAGES, SIZE = 256, 4, 4, 28
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
NUM_CAPTIONS = 24  # a multiple of MAX_IMAGES: one epoch is 6 whole windows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    captions, images = make_coco(root / "coco", NUM_CAPTIONS)
    build_shards(
        coco_items(captions, images),
        root / "caption",
        kind="caption",
        samples_per_shard=5,
        input_id="t",
        progress=False,
    )
    jsonl, doc_images, tsv = make_interleaved(root / "docs", 6)
    build_shards(
        interleaved_items([jsonl], doc_images, url_map=load_url_map(tsv)),
        root / "interleaved",
        kind="interleaved",
        samples_per_shard=4,
        input_id="t",
        progress=False,
    )
    text = make_text_jsonl(root / "text", 40)
    build_text_index(
        jsonl_texts([text]), root / "text" / "corpus", TOK, docs_per_part=16, progress=False
    )
    return {"root": root, "captions": captions, "text": text}


def _config(corpus, **kwargs):
    root = corpus["root"]
    shards = ShardsConfig(
        caption=[str(root / "caption")],
        interleaved=[str(root / "interleaved")],
        text=[str(root / "text" / "corpus")],
    )
    options = dict(
        source="webdataset",
        shards=shards,
        max_images_per_sequence=MAX_IMAGES,
        caption_window=MAX_IMAGES,
    )
    return DataConfig(**{**options, **kwargs})


def _loader(cfg, seed=0, dp_rank=0, dp_size=1, micro_batch_size=2, seq_length=SEQ):
    loader, tokenizer = build_data(
        cfg,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_size=SIZE,
        image_mean=MEAN,
        image_std=STD,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    assert tokenizer.vocab_size == TOK.vocab_size
    return loader


def _equal(a, b):
    return all(torch.equal(a[key], b[key]) for key in BATCH_KEYS)


def _runs(row):
    runs, length = [], 0
    for token in row.tolist() + [None]:
        if token == IMG:
            length += 1
        elif length:
            runs, length = runs + [length], 0
    return runs


def test_every_sequence_follows_the_packing_contract(corpus):
    loader = _loader(_config(corpus))
    for _ in range(12):
        batch = next(loader)
        assert set(batch) == set(BATCH_KEYS)
        tokens, docs = batch["tokens"], batch["document_ids"]
        assert tokens.shape == (2, SEQ)
        assert batch["images"].shape == (int(batch["num_images"].sum()), 3, SIZE, SIZE)
        for row in range(2):
            assert int(batch["num_images"][row]) <= MAX_IMAGES
            assert _runs(tokens[row]) == [NUM_IMAGE_TOKENS] * int(batch["num_images"][row])
            real = int(batch["num_real_tokens"][row])
            assert (tokens[row, real:] == PAD).all() and (tokens[row, :real] != PAD).all()
        # No attention across packed documents: brute force over every pair of positions.
        mask = document_causal_mask(docs)[:, 0]
        i, j = torch.meshgrid(torch.arange(SEQ), torch.arange(SEQ), indexing="ij")
        allowed = (j <= i) & (docs[:, :, None] == docs[:, None, :])
        assert torch.equal(mask, ~allowed)
        # Loss only where the next token is text of the same document.
        labels, loss = batch["labels"], batch["loss_mask"].bool()
        assert (labels[loss] != IMG).all() and (labels[loss] != PAD).all()
        assert torch.equal(
            loss[:, :-1] & (docs[:, 1:] != docs[:, :-1]), torch.zeros_like(loss[:, :-1])
        )
        assert torch.equal(labels[:, :-1], tokens[:, 1:])


def _documents(tokens, docs, real):
    return [tokens[:real][docs[:real] == d].tolist() for d in docs[:real].unique().tolist()]


def test_one_caption_epoch_packs_every_pair_exactly_once(corpus):
    loader = _loader(_config(corpus, mixture={"caption": 1}), micro_batch_size=1)
    packed = []
    for _ in range(NUM_CAPTIONS // MAX_IMAGES):
        batch = next(loader)
        packed += _documents(
            batch["tokens"][0], batch["document_ids"][0], int(batch["num_real_tokens"][0])
        )
    data = json.loads(corpus["captions"].read_text())
    first = {}
    for a in sorted(data["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], a["caption"])
    expected = [
        [TOK.bos_token_id] + [IMG] * NUM_IMAGE_TOKENS + TOK.encode(c) + [TOK.eos_token_id]
        for c in first.values()
    ]
    assert sorted(packed) == sorted(expected)
    assert loader.stats()["unused_samples"] == 0


def test_interleaved_documents_are_cut_before_images_never_inside(corpus):
    seq = 48  # shorter than every document: each one is cut
    loader = _loader(
        _config(corpus, mixture={"interleaved": 1}), seq_length=seq, micro_batch_size=1
    )
    for _ in range(6):
        batch = next(loader)
        tokens, real = batch["tokens"][0], int(batch["num_real_tokens"][0])
        assert (batch["document_ids"][0, :real] == 0).all()  # one document per sequence
        assert _runs(tokens) == [NUM_IMAGE_TOKENS] * int(batch["num_images"][0])
        assert tokens[real - 1] != IMG  # a cut right after an image drops that image
        assert real > seq - NUM_IMAGE_TOKENS - 1  # cut at the first token that did not fit


def test_one_text_epoch_is_every_document_token_once(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(corpus["root"] / "text" / "corpus"))
    expected = Counter(t for i in range(len(dataset)) for t in dataset[i].tolist())
    num_tokens = sum(expected.values())
    loader = _loader(_config(corpus, mixture={"text": 1}), micro_batch_size=1)
    seen = Counter()
    for _ in range(-(-num_tokens // SEQ)):
        batch = next(loader)
        real = int(batch["num_real_tokens"][0])
        seen.update(batch["tokens"][0, :real].tolist())
        assert batch["images"].shape[0] == 0
    assert seen == expected
    full = next(loader)  # the next epoch starts with a full sequence
    assert int(full["num_real_tokens"][0]) == SEQ


def test_mixture_proportions_over_many_sequences(corpus):
    loader = _loader(_config(corpus))
    sources = [loader.builder.source_of(g) for g in range(3000)]
    # Exact per block of 1000 (largest remainder); a sampler ignoring the weights is off
    # by >= 10 points, so +-1 point also covers any future change to i.i.d. draws' noise.
    for name, share in {"caption": 0.45, "interleaved": 0.45, "text": 0.10}.items():
        assert abs(sources.count(name) / len(sources) - share) < 0.01, name
    batches = [next(loader) for _ in range(5)]
    ids = torch.cat([b["source_ids"] for b in batches]).tolist()
    assert ids == [SOURCE_IDS[s] for s in sources[:10]]


def test_batches_are_a_pure_function_of_seed_step_and_rank(corpus):
    cfg = _config(corpus)
    a = [next(_loader(cfg, seed=1)) for _ in range(1)]
    plain = _loader(cfg, seed=1)
    workers = _loader(_config(corpus, num_workers=2, prefetch_factor=2), seed=1)
    first = [next(plain) for _ in range(4)]
    assert _equal(a[0], first[0])
    assert all(_equal(x, next(workers)) for x in first)
    other_seed = _loader(cfg, seed=2)
    assert not all(_equal(x, next(other_seed)) for x in first)
    # Tensor/pipeline-parallel replicas of one DP rank build the same batches.
    replica_a, replica_b = _loader(cfg, dp_rank=1, dp_size=2), _loader(cfg, dp_rank=1, dp_size=2)
    assert all(_equal(next(replica_a), next(replica_b)) for _ in range(2))
    # Rank 1 of 2 reads odd global sequences, rank 0 the even ones.
    rank0 = next(_loader(cfg, dp_rank=0, dp_size=2, micro_batch_size=1))
    rank1 = next(_loader(cfg, dp_rank=1, dp_size=2, micro_batch_size=1))
    single = _loader(cfg, micro_batch_size=1)
    assert _equal(rank0, next(single)) and _equal(rank1, next(single))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_step_k_continues_exactly_on_two_dp_ranks(corpus, num_workers):
    cfg = _config(corpus, num_workers=num_workers)
    k, total = 3, 7
    states = []
    for rank in range(2):
        uninterrupted = _loader(cfg, seed=5, dp_rank=rank, dp_size=2)
        expected = [next(uninterrupted) for _ in range(total)]
        first = _loader(cfg, seed=5, dp_rank=rank, dp_size=2)
        [next(first) for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # plain JSON, no pickles
        states.append(state)
        first.close()
        resumed = _loader(cfg, seed=5, dp_rank=rank, dp_size=2)
        resumed.load_state_dict(state)
        assert all(_equal(next(resumed), batch) for batch in expected[k:]), rank
    assert states[0] == states[1]  # one copy serves every rank


def test_resume_with_another_dp_size_continues_the_global_stream(corpus):
    cfg = _config(corpus)
    old = [_loader(cfg, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):  # 3 steps x 2 ranks x 2 sequences = 12 global sequences
        [next(loader) for loader in old]
    state = old[0].state_dict()
    single = _loader(cfg, micro_batch_size=1)
    single.load_state_dict({**state, "dp_size": 1, "num_sequences_consumed": 12, "base": 0})
    reference = [next(single) for _ in range(6)]  # global sequences 12..17
    for rank in range(3):
        new = _loader(cfg, dp_rank=rank, dp_size=3, micro_batch_size=1)
        new.load_state_dict(state)
        batches = [next(new) for _ in range(2)]  # global 12 + rank, 15 + rank
        assert _equal(batches[0], reference[rank]) and _equal(batches[1], reference[rank + 3])
    again = _loader(cfg, dp_rank=0, dp_size=3, micro_batch_size=1)
    again.load_state_dict(state)
    next(again)
    assert again.state_dict()["base"] == 12 and again.state_dict()["dp_size"] == 3


def test_resume_with_another_seed_is_refused(corpus):
    state = _loader(_config(corpus), seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(_config(corpus), seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="format"):
        _loader(_config(corpus), seed=1).load_state_dict({"num_sequences_consumed": 3})


def test_synthetic_source_behind_the_same_interface():
    """The loader shards the synthetic builder over ranks exactly as it shards shards."""
    cfg = DataConfig()
    loader, _ = build_data(
        cfg,
        seq_length=SEQ,
        micro_batch_size=3,
        num_image_tokens=4,
        image_size=SIZE,
        image_mean=MEAN,
        image_std=STD,
        seed=7,
        dp_rank=1,
        dp_size=2,
    )
    for step in range(2):
        batch = next(loader)
        expected = [loader.builder.sequence((step * 3 + i) * 2 + 1)[0] for i in range(3)]
        assert _equal(batch, collate(expected))
    assert sum(loader.skip_counts().values()) == 0
