"""The shortcuts a generation takes give what the general paths give.

- ``compat/inference_layers.py`` runs linear layers, MLPs and transformer layers directly
  while generating, and ``compat/inference.py`` the self-attention: the logits of a
  prefill and of decode steps are the bits Megatron-Core's own forwards give;
- a decode step hands attention a ready mask (``runner.visible_keys``), or none at all
  when every row is one document (``runner.ALL_VISIBLE``): the attention the document ids
  give.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm1_megatron.compat import inference_layers
from mm1_megatron.compat.inference import generation_mode
from mm1_megatron.inference.prompts import PAD_DOCUMENT, PROMPT_DOCUMENT
from mm1_megatron.inference.runner import ALL_VISIBLE, CachedModelRunner, visible_keys
from mm1_megatron.models.attention import attention_against_cache
from tests.conftest import make_tiny_config


def _decode_logits(model, tokens, documents, steps: int):
    """Prefill, then ``steps`` decode steps feeding fixed tokens: every step's logits."""
    batch, length = tokens.shape
    runner = CachedModelRunner(model, max_batch_size=batch, max_sequence_length=length + steps)
    ids = torch.cat([documents, torch.full((batch, steps), PROMPT_DOCUMENT)], dim=1)
    logits = [runner.forward(tokens, documents)]
    for step in range(steps):
        fed = torch.full((batch, 1), 10 + step)
        logits.append(runner.forward(fed, ids))
    return logits


@pytest.mark.parametrize("padded", [False, True])
def test_direct_layer_paths_give_megatrons_logits_bit_for_bit(
    build_tiny_model, monkeypatch, padded
):
    cfg = make_tiny_config("model.llm.max_sequence_length=64", "training.seq_length=64")
    model = build_tiny_model(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 200, (3, 12), generator=generator)
    documents = torch.full_like(tokens, PROMPT_DOCUMENT)
    if padded:
        documents[1, :5] = PAD_DOCUMENT
    with torch.no_grad(), generation_mode():
        direct = _decode_logits(model, tokens, documents, steps=3)
    layer = model.language_model.decoder.layers[0]  # the direct paths were taken
    assert layer.__dict__["_mm1_direct_layer"] and layer.mlp.__dict__["_mm1_direct_mlp"]
    assert layer.self_attention.__dict__["_mm1_direct_attention"]
    assert layer.self_attention.linear_qkv.__dict__["_mm1_direct_linear"]
    # A depth that generation_mode() cannot raise above 0: Megatron-Core's forwards.
    monkeypatch.setattr(inference_layers, "_depth", [-(10**6)])
    with torch.no_grad(), generation_mode():
        general = _decode_logits(model, tokens, documents, steps=3)
    assert len(direct) == 4
    for ours, megatrons in zip(direct, general):
        assert torch.equal(ours, megatrons)


def _documents(batch: int, length: int, seed: int) -> torch.Tensor:
    """Left padding of random length per row, then one prompt document."""
    rng = np.random.default_rng(seed)
    ids = torch.full((batch, length), PROMPT_DOCUMENT)
    for row in range(batch):
        ids[row, : int(rng.integers(0, length // 2))] = PAD_DOCUMENT
    return ids


def _qkv(batch: int, heads: int, groups: int, sq: int, sk: int):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, sq, 8, generator=generator)
    k, v = (torch.randn(batch, groups, sk, 8, generator=generator) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("new", [1, 3])
def test_a_ready_mask_is_the_attention_of_the_document_ids(new):
    documents = _documents(4, 20, seed=new)
    q, k, v = _qkv(4, 4, 2, new, 20)
    from_ids = attention_against_cache(q, k, v, documents, softmax_scale=0.3, grouped=True)
    mask = visible_keys(documents, new)
    assert mask.shape == (4, 1, new, 20)
    ready = attention_against_cache(q, k, v, mask, softmax_scale=0.3, grouped=True)
    assert torch.equal(ready, from_ids)


def test_all_visible_is_attention_to_every_cached_key():
    documents = torch.full((3, 16), PROMPT_DOCUMENT)
    q, k, v = _qkv(3, 4, 2, 1, 16)
    from_ids = attention_against_cache(q, k, v, documents, softmax_scale=0.3, grouped=True)
    unmasked = attention_against_cache(q, k, v, ALL_VISIBLE, softmax_scale=0.3, grouped=True)
    torch.testing.assert_close(unmasked, from_ids)


def test_a_ready_mask_of_the_wrong_shape_is_refused():
    q, k, v = _qkv(2, 4, 2, 1, 10)
    wrong = visible_keys(torch.full((2, 9), PROMPT_DOCUMENT), 1)  # 9 keys, not 10
    with pytest.raises(ValueError, match="ready mask"):
        attention_against_cache(q, k, v, wrong, softmax_scale=0.3, grouped=True)


def test_the_runner_drops_the_mask_only_when_no_row_is_padded(seeded):
    runner = object.__new__(CachedModelRunner)  # decode_mask reads no model state
    runner.device, runner._ids, runner._one_document = torch.device("cpu"), None, False
    one_document = torch.full((2, 8), PROMPT_DOCUMENT)
    assert runner.decode_mask(one_document, 6, 1) is ALL_VISIBLE
    padded = one_document.clone()
    padded[0, 0] = PAD_DOCUMENT
    mask = runner.decode_mask(padded, 6, 1)
    assert mask.shape == (2, 1, 1, 6) and not bool(mask[0, 0, 0, 0]) and bool(mask.all(-1)[1])
