"""Packing: limits, whole image runs, per-document labels/positions/attention, the cut rules."""

import numpy as np
import pytest
import torch

from mm1_megatron.batch.contract import document_causal_mask, expand_image_placeholders
from mm1_megatron.data.pipeline.packing import pack_sequence
from mm1_megatron.data.synthetic.world import SOURCES, Sample, SyntheticGenerator
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

TOK = SyntheticTokenizer()
IMG, PAD, BOS, EOS = TOK.image_token_id, TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id
WORD = TOK.encode("red")[0]
SIZE, NUM_IMAGE_TOKENS = 28, 4
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def _pack(samples, seq_length=256, max_images=16, num_image_tokens=NUM_IMAGE_TOKENS):
    return pack_sequence(
        samples,
        seq_length=seq_length,
        num_image_tokens=num_image_tokens,
        max_images=max_images,
        tokenizer=TOK,
        image_size=SIZE,
        image_mean=MEAN,
        image_std=STD,
    )


def _stream(source, seed):
    return SyntheticGenerator(TOK, SIZE).stream(source, np.random.default_rng(seed))


def _image(value):
    return torch.full((3, SIZE, SIZE), value)


def _runs(tokens, token_id):
    """Lengths of the maximal runs of ``token_id``."""
    runs, length = [], 0
    for token in tokens.tolist() + [None]:
        if token == token_id:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def _check_invariants(seq, seq_length, max_images):
    tokens, docs = seq.tokens, seq.document_ids
    assert tokens.shape == docs.shape == seq.labels.shape == (seq_length,)
    assert seq.images.shape[1:] == (3, SIZE, SIZE) and seq.num_images <= max_images
    assert _runs(tokens, IMG) == [NUM_IMAGE_TOKENS] * seq.num_images
    # Padding is a suffix forming one more document.
    assert seq.num_real_tokens == int((tokens != PAD).sum())
    assert (tokens[seq.num_real_tokens :] == PAD).all()
    if seq.num_real_tokens < seq_length:
        assert (docs[seq.num_real_tokens :] == docs[seq.num_real_tokens - 1] + 1).all()
    # Closed-form labels, loss mask and positions, position by position.
    doc_start = 0
    for i in range(seq_length):
        if i > 0 and docs[i] != docs[i - 1]:
            doc_start = i
        assert seq.position_ids[i] == i - doc_start
        next_token = int(tokens[i + 1]) if i + 1 < seq_length else PAD
        assert seq.labels[i] == next_token
        same_doc = i + 1 < seq_length and docs[i + 1] == docs[i]
        expected = same_doc and next_token not in (IMG, PAD)
        assert seq.loss_mask[i] == float(expected)
    # Attention stays inside documents and is causal.
    blocked = document_causal_mask(docs.unsqueeze(0))[0, 0]
    i, j = torch.meshgrid(torch.arange(seq_length), torch.arange(seq_length), indexing="ij")
    assert torch.equal(blocked, ~((docs[i] == docs[j]) & (j <= i)))


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seq_length, max_images", [(256, 16), (64, 3), (24, 1)])
def test_packing_invariants(source, seq_length, max_images):
    for seed in range(3):
        seq = _pack(_stream(source, seed), seq_length, max_images)
        assert seq.source == source
        _check_invariants(seq, seq_length, max_images)


def test_caption_packs_whole_samples_until_the_next_does_not_fit():
    seq = _pack(_stream("caption", 1), seq_length=256, max_images=16)
    reference = _stream("caption", 1)
    position, num_docs = 0, int(seq.document_ids[seq.num_real_tokens - 1]) + 1
    images = []
    for doc in range(num_docs):
        sample = next(reference)
        expanded = expand_image_placeholders(
            sample.token_ids, image_token_id=IMG, num_image_tokens=NUM_IMAGE_TOKENS
        )
        assert seq.tokens[position : position + len(expanded)].tolist() == expanded
        assert (seq.document_ids[position : position + len(expanded)] == doc).all()
        position += len(expanded)
        images += sample.images
    assert position == seq.num_real_tokens and num_docs > 1
    next_sample = next(reference)
    assert position + len(next_sample.token_ids) + NUM_IMAGE_TOKENS - 1 > 256
    # Images are the samples' images, normalised per channel.
    expected = (torch.stack(images) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(
        3, 1, 1
    )
    assert torch.allclose(seq.images, expected)


def test_caption_packing_stops_at_max_images():
    seq = _pack(_stream("caption", 2), seq_length=256, max_images=2)
    assert seq.num_images == 2 and int(seq.document_ids.max()) == 2  # 2 docs + padding


def test_whole_samples_in_order_with_padding_as_extra_document():
    samples = [Sample("text", [BOS] + [WORD] * 3 + [EOS], []) for _ in range(3)]
    seq = _pack(iter(samples), seq_length=12)
    assert seq.tokens.tolist() == [BOS, WORD, WORD, WORD, EOS] * 2 + [PAD] * 2
    assert seq.document_ids.tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert seq.position_ids.tolist() == list(range(5)) * 2 + [0, 1]
    assert seq.num_real_tokens == 10


def test_too_long_text_sample_is_truncated():
    samples = iter([Sample("text", [BOS] + [WORD] * 20 + [EOS], [])])
    seq = _pack(samples, seq_length=8)
    assert seq.tokens.tolist() == [BOS] + [WORD] * 7
    assert seq.num_real_tokens == 8 and seq.loss_mask.tolist() == [1.0] * 7 + [0.0]


def test_too_long_caption_sample_is_skipped():
    long = Sample("caption", [BOS, IMG] + [WORD] * 20 + [EOS], [_image(0.1)])
    short = Sample("caption", [BOS, IMG, WORD, EOS], [_image(0.9)])
    seq = _pack(iter([long, short, long]), seq_length=10)
    assert seq.tokens.tolist() == [BOS] + [IMG] * 4 + [WORD, EOS] + [PAD] * 3
    assert seq.num_images == 1 and torch.allclose(seq.images[0, 0], torch.tensor(2.0))


def test_endless_skipping_raises():
    with pytest.raises(ValueError, match="did not fit"):
        _pack(_stream("caption", 0), seq_length=4)


def test_mixed_sources_raise():
    samples = [
        Sample("text", [BOS, WORD, EOS], []),
        Sample("caption", [BOS, IMG, EOS], [_image(0.5)]),
    ]
    with pytest.raises(ValueError, match="one source"):
        _pack(iter(samples), seq_length=64)


INTERLEAVED = [BOS, WORD, IMG, WORD, WORD, IMG, WORD, EOS]


@pytest.mark.parametrize(
    "seq_length, max_images, expected_ids, num_images",
    [
        (64, 16, INTERLEAVED, 2),  # fits: one document, rest padding
        (13, 16, INTERLEAVED[:7], 2),  # cut in text after the second image
        (9, 16, INTERLEAVED[:5], 1),  # second image would be split: cut before it
        (6, 16, INTERLEAVED[:2], 0),  # cut right after an image: the image goes too
        (64, 1, INTERLEAVED[:5], 1),  # the image beyond max_images ends the document
        (64, 0, INTERLEAVED[:2], 0),
    ],
)
def test_interleaved_cut_rules(seq_length, max_images, expected_ids, num_images):
    sample = Sample("interleaved", INTERLEAVED, [_image(0.2), _image(0.7)])
    seq = _pack(iter([sample, sample]), seq_length, max_images)
    expected = expand_image_placeholders(
        expected_ids, image_token_id=IMG, num_image_tokens=NUM_IMAGE_TOKENS
    )
    assert seq.tokens[: seq.num_real_tokens].tolist() == expected
    assert seq.num_images == num_images
    assert (seq.document_ids[: seq.num_real_tokens] == 0).all()
    if num_images:
        assert torch.allclose(seq.images[0, 0], torch.tensor((0.2 - MEAN[0]) / STD[0]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        _pack(_stream("text", 0), seq_length=1)
    with pytest.raises(ValueError):
        _pack(_stream("text", 0), num_image_tokens=0)
    with pytest.raises(ValueError):
        pack_sequence(
            _stream("text", 0),
            seq_length=8,
            num_image_tokens=1,
            max_images=1,
            tokenizer=TOK,
            image_size=SIZE,
            image_mean=[0.5],
            image_std=[0.5],
        )
