"""Model FLOPs per training step, for throughput and MFU.

Counts matrix multiplies only (2 FLOPs per multiply-add) in the forward pass and
multiplies by 3 for forward + backward (no recomputation counted, as in the PaLM/MFU
convention). Attention scores are counted for the full ``s x s`` matrix, without a causal
discount, as Megatron-LM does. The image encoder and connector are included: at MM1's
shapes a ViT-H over 16 images per sequence is a large share of the work.
"""

from __future__ import annotations

import math
from typing import Optional

from mm1_megatron.config.schema import ModelConfig
from mm1_megatron.models import param_count

FORWARD_AND_BACKWARD = 3


def vision_encoder_forward_flops(model: ModelConfig) -> float:
    """Forward FLOPs of the ViT for one image."""
    v = model.vision
    num_patches = (v.image_size // v.patch_size) ** 2
    num_tokens = num_patches + (1 if v.use_class_token else 0)
    h, f = v.hidden_size, v.ffn_hidden_size
    per_layer_matmul = 4 * h * h + 2 * h * f  # QKV + proj + MLP, per token
    attention = 2 * num_tokens * h  # QK^T and attention x V, per token
    patch_embed = num_patches * v.num_channels * v.patch_size**2 * h
    return 2 * (patch_embed + v.num_layers * num_tokens * (per_layer_matmul + attention))


def connector_forward_flops(model: ModelConfig) -> float:
    """Forward FLOPs of the connector for one image (weights x positions they touch)."""
    c, v, h_llm = model.connector, model.vision, model.llm.hidden_size
    grid = v.image_size // v.patch_size
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
        return 2 * (stage1 * grid * grid + (stage2 + readout) * num_out)
    if c.type == "attn_pool":
        d = c.hidden_size
        kv_proj = 2 * d * v.hidden_size * grid * grid
        attention = 2 * num_out * grid * grid * d + 2 * d * d * num_out
        return 2 * (kv_proj + attention + readout * num_out)
    if c.type == "mlp":
        return 2 * readout * grid * grid
    return 2 * readout * num_out  # avg_pool


def language_model_forward_flops(model: ModelConfig, seq_length: int) -> float:
    """Forward FLOPs of the decoder for one sequence (active experts only)."""
    llm = model.llm
    counts = param_count.count_parameters(model)
    # Active non-embedding weights are all matmul weights except norms and the router's
    # tiny share; the output layer is a matmul even when tied.
    matmul_params = counts.llm_active_non_embedding + llm.vocab_size * llm.hidden_size
    attention = llm.num_layers * 2 * seq_length * llm.hidden_size
    return 2 * seq_length * (matmul_params + attention)


def training_flops_per_step(
    model: ModelConfig, *, num_sequences: int, seq_length: int, num_images: int
) -> float:
    per_image = vision_encoder_forward_flops(model) + connector_forward_flops(model)
    forward = (
        num_sequences * language_model_forward_flops(model, seq_length) + num_images * per_image
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
