"""Model FLOPs per training step, for throughput and MFU.

Counts matrix multiplies only (2 FLOPs per multiply-add) in the forward pass and
multiplies by 3 for forward + backward (no recomputation counted, as in the PaLM/MFU
convention). Decoder attention counts what per-document attention runs: the query-key
pairs a packed sequence allows, causal within each document, ``sum_d L_d (L_d + 1) / 2``
(``causal_attention_pairs``), not the ``s x s`` matrix; the ViT's attention is
bidirectional over each image's patches. The image encoder and connector are included: at
MM1's shapes a ViT-H over 16 images per sequence is a large share of the work. At native
resolution (``model.vision.native_resolution``) every image counts as ``max_patches``
patches: the size rule fills the budget up to a row or column of patches, so this is
the most an image costs and close to what it does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from mm1_megatron.config.schema import ModelConfig
from mm1_megatron.data.pipeline.balance import CostWeights
from mm1_megatron.models import param_count

FORWARD_AND_BACKWARD = 3


def patches_per_image(model: ModelConfig, image_size: Optional[int] = None) -> int:
    """The ViT's patches for one image (or tile) of ``image_size`` pixels (default: the
    encoder's own); at native resolution the budget ``max_patches``, whatever the size."""
    v = model.vision
    if v.native_resolution:
        return v.max_patches
    return ((image_size or v.image_size) // v.patch_size) ** 2


def vision_encoder_forward_flops(model: ModelConfig, image_size: Optional[int] = None) -> float:
    """Forward FLOPs of the ViT for one image (or tile) of ``image_size`` pixels (default:
    the encoder's own ``image_size``; native resolution: ``patches_per_image``)."""
    v = model.vision
    num_patches = patches_per_image(model, image_size)
    num_tokens = num_patches + (1 if v.use_class_token else 0)
    h, f = v.hidden_size, v.ffn_hidden_size
    per_layer_matmul = 4 * h * h + 2 * h * f  # QKV + proj + MLP, per token
    attention = 2 * num_tokens * h  # QK^T and attention x V, per token
    patch_embed = num_patches * v.num_channels * v.patch_size**2 * h
    return 2 * (patch_embed + v.num_layers * num_tokens * (per_layer_matmul + attention))


def connector_forward_flops(model: ModelConfig, image_size: Optional[int] = None) -> float:
    """Forward FLOPs of the connector for one image (weights x positions they touch)."""
    c, v, h_llm = model.connector, model.vision, model.llm.hidden_size
    num_patches = patches_per_image(model, image_size)
    num_out = c.num_output_tokens
    readout_in = {
        "c_abstractor": c.hidden_size if c.num_blocks_per_stage else v.hidden_size,
        "attn_pool": c.hidden_size,
    }.get(c.type, v.hidden_size)
    readout = param_count.readout_params(readout_in, h_llm, c.num_readout_layers)
    if c.type == "c_abstractor":
        n, width = c.num_blocks_per_stage, readout_in
        stage1 = sum(
            param_count.bottleneck_params(v.hidden_size if i == 0 else width, width)
            for i in range(n)
        )
        stage2 = n * param_count.bottleneck_params(width, width)
        return 2 * (stage1 * num_patches + (stage2 + readout) * num_out)
    if c.type == "attn_pool":
        d = c.hidden_size
        kv_proj = 2 * d * v.hidden_size * num_patches
        attention = 2 * num_out * num_patches * d + 2 * d * d * num_out
        return 2 * (kv_proj + attention + readout * num_out)
    if c.type == "mlp":
        return 2 * readout * num_patches
    return 2 * readout * num_out  # avg_pool


def causal_attention_pairs(document_ids: torch.Tensor) -> int:
    """Query-key pairs that causal attention within each packed document computes:
    ``sum over documents of L (L + 1) / 2`` for ``[b, s]`` (or ``[s]``) document ids.

    Documents are contiguous runs of one id; a run is a document even when its id repeats
    elsewhere in the row.
    """
    ids = document_ids.reshape(-1, document_ids.shape[-1]).cpu()
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    run_number = torch.cumsum(starts.flatten().long(), 0)  # a distinct number per run
    lengths = torch.bincount(run_number)[1:]
    return int((lengths * (lengths + 1) // 2).sum())


def one_document_pairs(seq_length: int) -> int:
    """``causal_attention_pairs`` of a sequence that is a single document."""
    return seq_length * (seq_length + 1) // 2


def decoder_attention_forward_flops(model: ModelConfig, attention_pairs: int) -> float:
    """Forward FLOPs of the decoder's core attention over ``attention_pairs`` causal
    query-key pairs, all layers: Q K^T and (scores x V), 2 x heads x head_dim (the hidden
    size, unless ``model.llm.head_dim`` decouples them) multiply-adds per pair and layer."""
    llm = model.llm
    return 2 * llm.num_layers * 2 * _attention_width(llm) * attention_pairs


def _attention_width(llm) -> int:
    return llm.num_attention_heads * llm.attention_head_dim


def decoder_layer_forward_flops(
    model: ModelConfig, seq_length: int, layer_index: int, attention_pairs: Optional[int] = None
) -> float:
    """Forward FLOPs of decoder layer ``layer_index`` for one sequence (active experts
    only; its norms and router are counted as matmul weights, as in
    ``language_model_forward_flops``). The layers and ``output_layer_forward_flops`` add up
    to ``language_model_forward_flops``."""
    llm = model.llm
    if attention_pairs is None:
        attention_pairs = one_document_pairs(seq_length)
    is_moe = param_count.moe_layer_flags(llm)[layer_index]
    weights = param_count.decoder_layer_params(llm, is_moe).active
    return 2 * (seq_length * weights + 2 * _attention_width(llm) * attention_pairs)


def output_layer_forward_flops(model: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs of the final norm and output layer for one sequence (a matmul even
    when tied to the embedding)."""
    llm = model.llm
    return 2 * seq_length * (llm.vocab_size * llm.hidden_size + llm.hidden_size)


def language_model_forward_flops(
    model: ModelConfig, seq_length: int, attention_pairs: Optional[int] = None
) -> float:
    """Forward FLOPs of the decoder for one sequence (active experts only), whose documents
    give ``attention_pairs`` causal query-key pairs (default: one document)."""
    llm = model.llm
    counts = param_count.count_parameters(model)
    if attention_pairs is None:
        attention_pairs = one_document_pairs(seq_length)
    # Active non-embedding weights are all matmul weights except norms and the router's
    # tiny share; the output layer is a matmul even when tied.
    matmul_params = counts.llm_active_non_embedding + llm.vocab_size * llm.hidden_size
    return 2 * seq_length * matmul_params + decoder_attention_forward_flops(model, attention_pairs)


def training_flops_per_step(
    model: ModelConfig,
    *,
    num_sequences: int,
    seq_length: int,
    num_images: int,
    attention_pairs: Optional[int] = None,
    image_size: Optional[int] = None,
) -> float:
    """FLOPs of a step of ``num_sequences`` sequences; ``attention_pairs`` is the total
    ``causal_attention_pairs`` over all of them (default: one document each);
    ``num_images`` images (or tiles) of ``image_size`` pixels."""
    if attention_pairs is None:
        attention_pairs = num_sequences * one_document_pairs(seq_length)
    per_image = vision_encoder_forward_flops(model, image_size) + connector_forward_flops(
        model, image_size
    )
    forward = (
        num_sequences * language_model_forward_flops(model, seq_length, attention_pairs=0)
        + decoder_attention_forward_flops(model, attention_pairs)
        + num_images * per_image
    )
    return FORWARD_AND_BACKWARD * forward


def model_flops_utilization(
    flops: float, seconds: float, num_devices: int, peak_flops_per_device: float
) -> float:
    if seconds <= 0 or peak_flops_per_device <= 0 or num_devices <= 0:
        return math.nan
    return flops / (seconds * num_devices * peak_flops_per_device)


# Dense (non-sparse) BF16 tensor-core peaks from NVIDIA's datasheets, by a substring of
# torch.cuda.get_device_name(); the first match wins, so variants come before the family.
# MFU is always measured against the BF16 peak, also for FP8 runs (like for like).
DENSE_BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),  # SXM (HBM3)
    ("H200", 989e12),  # SXM; GH200 too
    ("H800", 989e12),
    ("A100", 312e12),
)


def dense_bf16_peak_flops(device_name: str) -> Optional[float]:
    """The GPU's dense BF16 peak in FLOP/s, or None when the model is not in the table."""
    for key, peak in DENSE_BF16_PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def balance_weights(model: ModelConfig, image_size: Optional[int] = None) -> CostWeights:
    """Training FLOPs per count of a ``balance.SequenceCost``: what data balancing weighs
    sequences by. At a fixed size every encoder input costs the ViT and the connector over
    ``image_size`` (a tile's, with tiling); at native resolution an image's cost is a
    quadratic in its patches (linear layers, attention over patch pairs), fitted exactly
    from three patch counts."""
    pair = FORWARD_AND_BACKWARD * decoder_attention_forward_flops(model, 1)
    if not model.vision.native_resolution:
        per_input = vision_encoder_forward_flops(model, image_size) + connector_forward_flops(
            model, image_size
        )
        return CostWeights(FORWARD_AND_BACKWARD * per_input, per_attention_pair=pair)

    def per_image(num_patches: int) -> float:
        at = replace(model, vision=replace(model.vision, max_patches=num_patches))
        return vision_encoder_forward_flops(at) + connector_forward_flops(at)

    one, two, three = per_image(1), per_image(2), per_image(3)
    quadratic = (three - 2 * two + one) / 2
    linear = two - one - 3 * quadratic
    constant = one - linear - quadratic
    return CostWeights(
        FORWARD_AND_BACKWARD * constant,
        per_patch=FORWARD_AND_BACKWARD * linear,
        per_patch_pair=FORWARD_AND_BACKWARD * quadratic,
        per_attention_pair=pair,
    )
