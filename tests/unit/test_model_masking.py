"""Packed documents are isolated: no attention across documents, RoPE is relative."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch.contract import position_ids_from_documents

LEN_A, LEN_B, VOCAB = 6, 10, 256


@pytest.fixture
def model(tiny_config, build_tiny_model):
    m = build_tiny_model(tiny_config())
    m.eval()
    return m


def _logits(model, tokens, docs):
    with torch.no_grad():
        return model(tokens, position_ids_from_documents(docs), docs)


def _packed(a, b):
    tokens = torch.cat([a, b], dim=1)
    docs = torch.cat([torch.zeros_like(a), torch.ones_like(b)], dim=1)
    return tokens, docs


def _text(gen, length, batch=1):
    return torch.randint(10, VOCAB, (batch, length), generator=gen)  # no image token (3)


def test_logits_shape(model):
    gen = torch.Generator().manual_seed(0)
    tokens, docs = _packed(_text(gen, LEN_A), _text(gen, LEN_B))
    out = _logits(model, tokens, docs)
    assert out.shape == (1, LEN_A + LEN_B, VOCAB)
    assert torch.isfinite(out).all()


def test_doc_b_ignores_doc_a(model):
    gen = torch.Generator().manual_seed(1)
    a, a_other, b = _text(gen, LEN_A), _text(gen, LEN_A), _text(gen, LEN_B)
    out = _logits(model, *_packed(a, b))
    out_other = _logits(model, *_packed(a_other, b))
    # Document A's logits do depend on A's tokens ...
    assert (out[0, :LEN_A] - out_other[0, :LEN_A]).abs().max() > 1e-3
    # ... document B's do not.
    torch.testing.assert_close(out[0, LEN_A:], out_other[0, LEN_A:], rtol=0, atol=1e-6)


def test_doc_b_packed_equals_doc_b_alone(model):
    gen = torch.Generator().manual_seed(2)
    a, b = _text(gen, LEN_A), _text(gen, LEN_B)
    packed = _logits(model, *_packed(a, b))
    alone = _logits(model, b, torch.zeros_like(b))
    torch.testing.assert_close(packed[0, LEN_A:], alone[0], rtol=0, atol=1e-5)
    # And A at the front is A alone too (nothing from B leaks backwards).
    torch.testing.assert_close(
        packed[0, :LEN_A], _logits(model, a, torch.zeros_like(a))[0], rtol=0, atol=1e-5
    )


def test_three_documents_and_batch_rows(model):
    gen = torch.Generator().manual_seed(3)
    docs_spec = [[4, 7, 5], [9, 3, 4]]
    tokens = _text(gen, 16, batch=2)
    docs = torch.stack(
        [torch.repeat_interleave(torch.arange(3), torch.tensor(spec)) for spec in docs_spec]
    )
    packed = _logits(model, tokens, docs)
    for row, spec in enumerate(docs_spec):
        start = 0
        for length in spec:
            piece = tokens[row : row + 1, start : start + length]
            alone = _logits(model, piece, torch.zeros_like(piece))
            torch.testing.assert_close(
                packed[row, start : start + length], alone[0], rtol=0, atol=1e-5
            )
            start += length


def test_control_plain_causal_mask_leaks_across_documents(model):
    # Without the document mask (one document id for the whole row) B does see A; this
    # shows the test above would fail if the mask were ignored.
    gen = torch.Generator().manual_seed(4)
    a, a_other, b = _text(gen, LEN_A), _text(gen, LEN_A), _text(gen, LEN_B)
    tokens, _ = _packed(a, b)
    tokens_other, _ = _packed(a_other, b)
    one_doc = torch.zeros_like(tokens)
    out = _logits(model, tokens, one_doc)
    out_other = _logits(model, tokens_other, one_doc)
    assert (out[0, LEN_A:] - out_other[0, LEN_A:]).abs().max() > 1e-3


def test_causality_within_a_document(model):
    gen = torch.Generator().manual_seed(5)
    tokens = _text(gen, LEN_B)
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1 - 10) % (VOCAB - 10) + 10
    docs = torch.zeros_like(tokens)
    out, out_changed = _logits(model, tokens, docs), _logits(model, changed, docs)
    torch.testing.assert_close(out[0, :-1], out_changed[0, :-1], rtol=0, atol=1e-6)
    assert (out[0, -1] - out_changed[0, -1]).abs().max() > 1e-4


def test_image_tokens_without_images_raise(model):
    tokens = torch.tensor([[10, 3, 3, 3, 3, 11]])
    with pytest.raises(ValueError, match="no images"):
        _logits(model, tokens, torch.zeros_like(tokens))


def test_images_only_affect_their_own_document(model):
    gen = torch.Generator().manual_seed(6)
    a = _text(gen, LEN_A)
    a[0, 1:5] = 3  # document A holds one image (4 connector tokens)
    b = _text(gen, LEN_B)
    tokens, docs = _packed(a, b)
    image = torch.randn(1, 3, 56, 56, generator=gen)
    with torch.no_grad():
        args = (position_ids_from_documents(docs), docs)
        out = model(tokens, *args, images=image)
        out_other = model(tokens, *args, images=torch.randn(1, 3, 56, 56, generator=gen))
    assert (out[0, 5:LEN_A] - out_other[0, 5:LEN_A]).abs().max() > 1e-4
    torch.testing.assert_close(out[0, LEN_A:], out_other[0, LEN_A:], rtol=0, atol=1e-6)


def test_per_token_loss_with_labels(model):
    gen = torch.Generator().manual_seed(7)
    tokens, docs = _packed(_text(gen, LEN_A), _text(gen, LEN_B))
    labels = torch.roll(tokens, -1, dims=1)
    logits = _logits(model, tokens, docs)
    with torch.no_grad():
        loss = model(tokens, position_ids_from_documents(docs), docs, labels=labels)
    assert loss.shape == (1, LEN_A + LEN_B)
    expected = torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")
    torch.testing.assert_close(loss[0], expected, rtol=1e-5, atol=1e-5)
