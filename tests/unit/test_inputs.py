"""The packed-sequence input contract: placeholders, labels, positions, masks, merging."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch.contract import (
    document_causal_mask,
    expand_image_placeholders,
    labels_and_loss_mask,
    merge_image_embeddings,
    position_ids_from_documents,
)

IMG, PAD, BOS = 3, 0, 1


# ---- expand_image_placeholders ---------------------------------------------------------


@pytest.mark.parametrize(
    "tokens, n, expected",
    [
        ([], 4, []),
        ([5, 6, 7], 4, [5, 6, 7]),
        ([IMG], 4, [IMG, IMG, IMG, IMG]),
        ([1, IMG, 5, IMG], 3, [1, IMG, IMG, IMG, 5, IMG, IMG, IMG]),
        ([IMG, IMG, 9], 2, [IMG, IMG, IMG, IMG, 9]),
        ([1, IMG, 5], 1, [1, IMG, 5]),
        ([1, IMG, 5], 0, [1, 5]),
    ],
)
def test_expand_image_placeholders(tokens, n, expected):
    assert expand_image_placeholders(tokens, image_token_id=IMG, num_image_tokens=n) == expected


def test_expand_does_not_modify_input_and_accepts_tuples():
    tokens = (1, IMG, 2)
    out = expand_image_placeholders(tokens, image_token_id=IMG, num_image_tokens=2)
    assert out == [1, IMG, IMG, 2] and tokens == (1, IMG, 2)


# ---- labels_and_loss_mask --------------------------------------------------------------


def test_labels_and_loss_mask_two_docs_images_and_padding():
    #          doc 0 ------------  doc 1 -------------  padding
    tokens = [
        [BOS, IMG, IMG, 7, 8, BOS, 9, IMG, IMG, 10, PAD, PAD],
        [BOS, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
    ]
    docs = [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2], [0] * 12]
    labels, mask = labels_and_loss_mask(
        torch.tensor(tokens), torch.tensor(docs), image_token_id=IMG, pad_token_id=PAD
    )
    expected_labels = torch.tensor(
        [
            [IMG, IMG, 7, 8, BOS, 9, IMG, IMG, 10, PAD, PAD, PAD],
            [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, PAD],
        ]
    )
    # Row 0, position by position: targets IMG, IMG (image) -> 0; 7, 8 -> 1; BOS of the
    # next document -> 0; 9 -> 1; IMG, IMG -> 0; 10 -> 1; target PAD / other doc -> 0.
    expected_mask = torch.tensor(
        [[0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]],
        dtype=torch.float32,
    )
    assert torch.equal(labels, expected_labels)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, expected_mask)


def test_loss_mask_zero_at_document_boundary_even_for_text():
    # The target of the last token of doc 0 is text (42) but belongs to doc 1.
    tokens = torch.tensor([[11, 12, 42, 43]])
    docs = torch.tensor([[0, 0, 1, 1]])
    labels, mask = labels_and_loss_mask(tokens, docs, image_token_id=IMG, pad_token_id=PAD)
    assert labels.tolist() == [[12, 42, 43, PAD]]
    assert mask.tolist() == [[1.0, 0.0, 1.0, 0.0]]


def test_labels_and_loss_mask_1d():
    labels, mask = labels_and_loss_mask(
        torch.tensor([4, IMG, 6]), torch.tensor([0, 0, 0]), image_token_id=IMG, pad_token_id=PAD
    )
    assert labels.tolist() == [IMG, 6, PAD] and mask.tolist() == [0.0, 1.0, 0.0]


# ---- position_ids_from_documents -------------------------------------------------------


def test_position_ids_restart_per_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [7, 7, 7, 7, 7, 7, 7, 7, 7]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert torch.equal(position_ids_from_documents(docs), expected)


def test_position_ids_single_token_documents_and_reused_ids():
    docs = torch.tensor([[0, 1, 2, 2, 0, 0, 5]])
    assert position_ids_from_documents(docs).tolist() == [[0, 0, 0, 1, 0, 1, 0]]


def test_position_ids_random_against_loop():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 6, (40,), generator=gen)
    docs = torch.repeat_interleave(torch.arange(40), lengths)[:64].reshape(2, 32)
    out = position_ids_from_documents(docs)
    for b in range(2):
        pos = 0
        for i in range(32):
            if i > 0 and docs[b, i] != docs[b, i - 1]:
                pos = 0
            assert out[b, i] == pos
            pos += 1


# ---- document_causal_mask --------------------------------------------------------------


def _reference_mask(docs: torch.Tensor) -> torch.Tensor:
    b, s = docs.shape
    blocked = torch.ones(b, 1, s, s, dtype=torch.bool)
    for n in range(b):
        for q in range(s):
            for k in range(s):
                if k <= q and docs[n, q] == docs[n, k]:
                    blocked[n, 0, q, k] = False
    return blocked


@pytest.mark.parametrize(
    "docs",
    [
        [[0, 0, 0, 0, 0, 0]],
        [[0, 0, 1, 1, 1, 2], [0, 1, 2, 3, 4, 5]],
        [[4, 4, 4, 9, 9, 9], [0, 0, 0, 0, 1, 1]],
    ],
)
def test_document_causal_mask_matches_loop(docs):
    docs = torch.tensor(docs)
    mask = document_causal_mask(docs)
    assert mask.dtype == torch.bool and mask.shape == (docs.shape[0], 1, 6, 6)
    assert torch.equal(mask, _reference_mask(docs))


def test_document_causal_mask_random_against_loop():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 5, (30,), generator=gen)
    docs = torch.repeat_interleave(torch.arange(30), lengths)[:36].reshape(3, 12)
    assert torch.equal(document_causal_mask(docs), _reference_mask(docs))


def test_document_causal_mask_explicit_small_case():
    mask = document_causal_mask(torch.tensor([[0, 0, 1]]))[0, 0]
    # True = blocked. Row q lists keys 0..2.
    assert mask.tolist() == [[False, True, True], [False, False, True], [True, True, False]]


# ---- merge_image_embeddings ------------------------------------------------------------


def test_merge_places_images_in_order_of_appearance():
    s, b, h, per_image = 6, 2, 4, 2
    tokens = torch.tensor([[5, IMG, IMG, 6, IMG, IMG], [IMG, IMG, 7, 8, 9, 4]])
    text = torch.arange(s * b * h, dtype=torch.float32).reshape(s, b, h)
    # Image k, token j carries the value -(100 k + 10 j + 1) in every channel.
    images = torch.stack(
        [
            torch.stack([torch.full((h,), -(100.0 * k + 10 * j + 1)) for j in range(per_image)])
            for k in range(3)
        ]
    )
    merged = merge_image_embeddings(text, images, tokens, image_token_id=IMG)

    expected = text.clone()
    # (s index, b index) -> (image, token): row 0 holds images 0 and 1, row 1 image 2.
    placement = {
        (1, 0): (0, 0),
        (2, 0): (0, 1),
        (4, 0): (1, 0),
        (5, 0): (1, 1),
        (0, 1): (2, 0),
        (1, 1): (2, 1),
    }
    for (si, bi), (k, j) in placement.items():
        expected[si, bi] = -(100.0 * k + 10 * j + 1)
    assert merged.shape == (s, b, h)
    assert torch.equal(merged, expected)
    # The text embeddings passed in are left untouched.
    assert torch.equal(text, torch.arange(s * b * h, dtype=torch.float32).reshape(s, b, h))


def test_merge_is_differentiable_in_both_inputs():
    tokens = torch.tensor([[IMG, 5], [6, IMG]])
    text = torch.randn(2, 2, 3, requires_grad=True)
    images = torch.randn(2, 1, 3, requires_grad=True)
    merged = merge_image_embeddings(text, images, tokens, image_token_id=IMG)
    merged.sum().backward()
    assert torch.equal(images.grad, torch.ones_like(images))
    # Text rows at image positions are replaced, so they get no gradient.
    expected = torch.ones(2, 2, 3)
    expected[0, 0] = 0  # s=0, b=0 is an image
    expected[1, 1] = 0  # s=1, b=1 is an image
    assert torch.equal(text.grad, expected)


@pytest.mark.parametrize("num_images, per_image", [(2, 2), (4, 2), (3, 3), (3, 1)])
def test_merge_raises_on_count_mismatch(num_images, per_image):
    tokens = torch.tensor(
        [[5, IMG, IMG, 6, IMG, IMG], [IMG, IMG, 7, 8, 9, 4]]
    )  # 6 image slots = 3 images x 2
    text = torch.zeros(6, 2, 4)
    images = torch.zeros(num_images, per_image, 4)
    with pytest.raises(ValueError, match="image-token positions"):
        merge_image_embeddings(text, images, tokens, image_token_id=IMG)


def test_merge_with_no_images_returns_copy():
    tokens = torch.tensor([[5, 6]])
    text = torch.randn(2, 1, 4)
    merged = merge_image_embeddings(text, torch.zeros(0, 2, 4), tokens, image_token_id=IMG)
    assert torch.equal(merged, text)


def test_trainer_rejects_placeholders_without_images_on_the_host():
    """The model skips this check on GPU (it would stall each micro-batch); the trainer
    makes it on the host copy of every micro-batch instead."""
    from types import SimpleNamespace

    from mm1_megatron.training.trainer import Trainer

    trainer = SimpleNamespace(tokenizer=SimpleNamespace(image_token_id=3))
    text_only = {"tokens": torch.tensor([[5, 6, 7]]), "images": torch.zeros(0, 3, 8, 8)}
    assert Trainer._checked(trainer, text_only) is text_only
    broken = {"tokens": torch.tensor([[5, 3, 7]]), "images": torch.zeros(0, 3, 8, 8)}
    with pytest.raises(ValueError, match="image placeholders but no images"):
        Trainer._checked(trainer, broken)
