"""The loader over the synthetic world: batch layout, mixture proportions, determinism per
(seed, step, rank), resume. The same ``MicroBatchLoader`` serves shards (test_shard_pipeline)."""

import pytest
import torch

from mm1_megatron.config.schema import DataConfig
from mm1_megatron.data import BATCH_KEYS, SOURCE_IDS, build_data
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

TOK = SyntheticTokenizer()
SEQ_LENGTH, NUM_IMAGE_TOKENS, SIZE, BATCH = 256, 4, 28, 3
MEAN, STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]


def _loader(seed=0, dp_rank=0, dp_size=1, micro_batch_size=BATCH, **data_kwargs):
    loader, _ = build_data(
        DataConfig(**data_kwargs),
        seq_length=SEQ_LENGTH,
        micro_batch_size=micro_batch_size,
        num_image_tokens=NUM_IMAGE_TOKENS,
        image_size=SIZE,
        image_mean=MEAN,
        image_std=STD,
        seed=seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return loader


def _sequence(loader, global_index):
    sequence, _ = loader.builder.sequence(global_index)
    return sequence


def _batches(loader, num_steps):
    return [next(loader) for _ in range(num_steps)]


def _equal(a, b):
    return all(torch.equal(a[key], b[key]) for key in BATCH_KEYS)


def test_batch_layout():
    loader = _loader(max_images_per_sequence=5)
    for step in range(4):
        batch = next(loader)
        assert set(batch) == set(BATCH_KEYS)
        for key in ("tokens", "labels", "position_ids", "document_ids"):
            assert batch[key].shape == (BATCH, SEQ_LENGTH) and batch[key].dtype == torch.long
        assert batch["loss_mask"].dtype == torch.float32
        images, num_images = batch["images"], batch["num_images"]
        assert images.dtype == torch.float32 and images.shape[1:] == (3, SIZE, SIZE)
        assert images.shape[0] == int(num_images.sum()) and int(num_images.max()) <= 5
        assert (
            (batch["tokens"] == TOK.image_token_id).sum(dim=1) == num_images * NUM_IMAGE_TOKENS
        ).all()
        assert (batch["num_real_tokens"] == (batch["tokens"] != TOK.pad_token_id).sum(1)).all()
        expected_sources = [
            SOURCE_IDS[loader.builder.source_of(step * BATCH + i)] for i in range(BATCH)
        ]
        assert batch["source_ids"].tolist() == expected_sources


def test_images_concatenate_in_order_of_appearance():
    loader = _loader(seed=4)
    batch = next(loader)
    per_sequence = [_sequence(loader, i).images for i in range(BATCH)]
    assert torch.equal(batch["images"], torch.cat(per_sequence))
    # De-normalised images are the generator's [0, 1] pixels.
    pixels = batch["images"] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5


def test_text_only_batch_has_empty_images():
    batch = next(_loader(mixture={"text": 1.0}))
    assert batch["images"].shape == (0, 3, SIZE, SIZE)
    assert (batch["source_ids"] == SOURCE_IDS["text"]).all()


@pytest.mark.parametrize(
    "mixture, expected",
    [
        (None, {"caption": 0.45, "interleaved": 0.45, "text": 0.10}),
        ({"caption": 1.0, "text": 3.0}, {"caption": 0.25, "interleaved": 0.0, "text": 0.75}),
    ],
)
def test_mixture_proportions(mixture, expected):
    loader = _loader(seed=123) if mixture is None else _loader(seed=123, mixture=mixture)
    num_sequences = 2000
    sources = [loader.builder.source_of(g) for g in range(num_sequences)]
    # Binomial std of a share p over n=2000 draws: sqrt(p(1-p)/n) <= 1.1pp (p=0.45), so
    # +-4pp is > 3.5 std: a correct sampler essentially never fails, while a mixture
    # ignoring the weights (e.g. uniform 33/33/33) is off by >= 12pp.
    for name, share in expected.items():
        assert abs(sources.count(name) / num_sequences - share) < 0.04, name
    if mixture is None:  # source_of is what the batches use (checked in test_batch_layout)
        batch_ids = torch.cat([b["source_ids"] for b in _batches(_loader(seed=123), 2)])
        assert batch_ids.tolist() == [SOURCE_IDS[s] for s in sources[: BATCH * 2]]


def test_same_seed_step_rank_gives_same_batches():
    a, b = _batches(_loader(seed=1), 3), _batches(_loader(seed=1), 3)
    assert all(_equal(x, y) for x, y in zip(a, b))
    c = _batches(_loader(seed=2), 3)
    assert not any(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
    # Step k of a fresh loader positioned at k equals step k of a loader iterated to k.
    jumped = _loader(seed=1)
    jumped.load_state_dict(dict(jumped.state_dict(), num_sequences_consumed=2 * BATCH))
    assert _equal(next(jumped), a[2])


def test_dp_ranks_take_interleaved_global_indices():
    rank0 = _batches(_loader(seed=3, dp_rank=0, dp_size=2), 2)
    rank1 = _batches(_loader(seed=3, dp_rank=1, dp_size=2), 2)
    assert not any(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(rank0, rank1))
    # Rank r's j-th sequence is global sequence j * dp_size + r of a single-rank run.
    single = _loader(seed=3)
    for step, batch in enumerate(rank1):
        for i in range(BATCH):
            seq = _sequence(single, (step * BATCH + i) * 2 + 1)
            assert torch.equal(batch["tokens"][i], seq.tokens)


def test_resume_from_state_dict_continues_exactly():
    uninterrupted = _batches(_loader(seed=9, dp_rank=1, dp_size=2), 5)
    first = _loader(seed=9, dp_rank=1, dp_size=2)
    _batches(first, 2)
    state = first.state_dict()
    assert state["num_sequences_consumed"] == 2 * BATCH
    resumed = _loader(seed=9, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    assert all(_equal(x, y) for x, y in zip(_batches(resumed, 3), uninterrupted[2:]))


def test_resume_with_other_seed_raises():
    state = _loader(seed=9, dp_size=2).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _loader(seed=8, dp_size=2).load_state_dict(state)


def test_resume_at_another_dp_size_continues_the_global_stream():
    first = _loader(seed=9, dp_rank=0, dp_size=2)
    _batches(first, 2)  # global sequences 0 .. 4 * BATCH - 1 consumed over both ranks
    resumed = _loader(seed=9, dp_rank=1, dp_size=4)
    resumed.load_state_dict(first.state_dict())
    batch = next(resumed)
    for i in range(BATCH):
        expected = _sequence(resumed, 4 * BATCH + i * 4 + 1)
        assert torch.equal(batch["tokens"][i], expected.tokens)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mixture": {"audio": 1.0}},
        {"mixture": {"text": -1.0, "caption": 1.0}},
        {"mixture": {"text": 0.0}},
        {"source": "webdataset"},
        {"dp_rank": 2, "dp_size": 2},
        {"micro_batch_size": 0},
        {"seed": -1},
    ],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(ValueError):
        _loader(**kwargs)


def test_rng_is_per_sequence():
    """Sequence content depends only on (seed, global index), not on what came before."""
    loader = _loader(seed=5)
    later = _sequence(loader, 7)
    _batches(loader, 2)
    assert torch.equal(_sequence(loader, 7).tokens, later.tokens)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_dropped_loader_is_freed_at_once(num_workers):
    """No reference cycle through the prefetching ``DataLoader`` (its sampler must not hold
    the loader): dropping the last reference frees the loader, and stops its worker
    processes, without waiting for the cyclic garbage collector."""
    import gc
    import weakref

    loader = _loader(num_workers=num_workers)
    next(loader)
    alive = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert alive() is None
    finally:
        gc.enable()
