"""The FLOPs behind MFU (the x-axis of scaling studies) against torch's own FLOP counter
on one real forward and backward of a tiny model.

Conventions, as ``training/flops.py`` states them: matmuls and convolutions only, 2 FLOPs
per multiply-add; decoder attention over the query-key pairs that per-document causal
attention computes (``sum_d L_d (L_d + 1) / 2``), the ViT's over all patch pairs; a training
step is 3x the forward (the PaLM/Megatron MFU convention).

torch's counter does not see the CPU flash-attention kernel, so the model is counted with
the dense-mask reference attention, whose score matmuls it sees (full ``s x s``); those are
swapped for the per-document causal pairs, counted by brute force from the mask itself.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import IMAGE_TOKEN_ID

# Tiled: 112 px tiles (an 8x8 patch grid) for an encoder built at 56 px (4x4).
TILED = ("data.tiling.mode=static", "data.tiling.tile_size=112", "data.max_images_per_sequence=20")
# Qwen3's attention: q/k norms and 4 heads of 12 in a 32-wide decoder.
QWEN3 = ("model.llm.qk_norm=true", "model.llm.head_dim=12")


@pytest.fixture(params=[(), TILED, QWEN3], ids=["images", "tiles", "qwen3_heads"])
def one_step(request, tiny_config, build_tiny_model):
    from mm1_megatron.batch import model_inputs
    from mm1_megatron.data.build import build_run_data

    cfg = tiny_config("model.attention=dense_mask_reference", *request.param)
    model = build_tiny_model(cfg)
    data, _ = build_run_data(cfg, seed=1)
    batch = model_inputs(next(data), torch.device("cpu"))
    assert batch["images"].shape[0] > 0 and IMAGE_TOKEN_ID in batch["tokens"]
    return cfg, model, batch


def _count(model, batch, *, backward: bool):
    from mm1_megatron.batch import run_model

    with FlopCounterMode(display=False) as counter:
        per_token_loss = run_model(model, batch)
        if backward:
            (per_token_loss * batch["loss_mask"]).sum().backward()
    return counter


def test_flops_per_step_match_torchs_flop_counter(one_step):
    from mm1_megatron.training import flops

    cfg, model, batch = one_step
    num_sequences, seq_length = batch["tokens"].shape
    num_images, size = batch["images"].shape[0], batch["images"].shape[-1]
    v, llm = cfg.model.vision, cfg.model.llm

    forward = _count(model, batch, backward=False)
    by_op = {str(op): count for op, count in forward.get_flop_counts()["Global"].items()}
    # Attention: QK^T and (scores x V), full matrices, decoder and ViT, exactly.
    vit_tokens = (size // v.patch_size) ** 2 + (1 if v.use_class_token else 0)
    heads_width = llm.num_attention_heads * llm.attention_head_dim
    attention = (
        4 * llm.num_layers * seq_length**2 * heads_width * num_sequences
        + 4 * v.num_layers * vit_tokens**2 * v.hidden_size * num_images
    )
    assert by_op["aten.bmm"] + by_op["aten.baddbmm"] == attention

    # Per-document causal pairs: the entries the reference's mask leaves open.
    from mm1_megatron.batch.contract import document_causal_mask

    pairs = flops.causal_attention_pairs(batch["document_ids"])
    assert pairs == int((~document_causal_mask(batch["document_ids"])).sum())
    assert pairs < num_sequences * seq_length**2 // 2  # packed: well below one document's
    decoder_attention = 4 * llm.num_layers * heads_width * pairs
    counted_forward = forward.get_total_flops()
    counted_decoder_attention = 4 * llm.num_layers * seq_length**2 * heads_width * num_sequences
    per_document_forward = counted_forward - counted_decoder_attention + decoder_attention

    formula_forward = sum(
        flops.language_model_forward_flops(cfg.model, seq_length, flops.causal_attention_pairs(row))
        for row in batch["document_ids"]
    ) + num_images * (
        flops.vision_encoder_forward_flops(cfg.model, size)
        + flops.connector_forward_flops(cfg.model, size)
    )
    # The formula counts norm and bias parameters as matmul weights, and the C-Abstractor's
    # squeeze-excite weights at every grid position (they run once per image): a small
    # over-count, which grows with the patch grid (1.6% with the 8x8 tiles here).
    assert per_document_forward <= formula_forward <= 1.02 * per_document_forward

    step = flops.training_flops_per_step(
        cfg.model,
        num_sequences=num_sequences,
        seq_length=seq_length,
        num_images=num_images,
        attention_pairs=pairs,
        image_size=size,
    )
    assert step == pytest.approx(3 * formula_forward, rel=1e-12)
    # The backward is 2x the forward except for the patch embedding, whose input (the
    # pixels) needs no gradient: the 3x convention counts it anyway.
    model.zero_grad()
    counted_step = _count(model, batch, backward=True).get_total_flops()
    patch_forward = (
        2
        * num_images
        * (size // v.patch_size) ** 2
        * v.num_channels
        * v.patch_size**2
        * v.hidden_size
    )
    assert counted_step == 3 * counted_forward - patch_forward


def test_causal_pairs_count_each_run_of_an_id_as_a_document():
    from mm1_megatron.training.flops import causal_attention_pairs, one_document_pairs

    # Runs of 2, 3, 1 tokens; the id 0 returns but is a new document (packing never does
    # this, the count must not merge them).
    assert causal_attention_pairs(torch.tensor([0, 0, 1, 1, 1, 0])) == 3 + 6 + 1
    assert causal_attention_pairs(torch.zeros(2, 5, dtype=torch.long)) == 2 * 15
    assert one_document_pairs(5) == 15
