"""Activation memory of one micro-batch on one rank of a pipeline stage, by component:
the image encoder (stem and layers), the connector, the embedding, the decoder layers and
the logits. Terms are bytes (see ``activations.py`` for a layer's inventory)."""

from __future__ import annotations

from typing import Dict, Optional

from mm1_megatron.config.schema import MM1Config
from mm1_megatron.models.param_count import moe_layer_flags
from mm1_megatron.scaling.estimate.activations import (
    FP32,
    Kernels,
    Terms,
    decoder_layer_shape,
    moe_terms,
    transformer_layer_terms,
    vision_layer_shape,
)
from mm1_megatron.scaling.estimate.context_parallel import CountedShare, gathered_attention_terms
from mm1_megatron.scaling.estimate.stages import Stage
from mm1_megatron.scaling.estimate.workload import (
    Workload,
    pixel_values_per_image,
    vision_tokens_per_image,
)
from mm1_megatron.training.flops import patches_per_image

INT64 = 8


def _scaled(terms: Terms, factor: float) -> Terms:
    return {name: value * factor for name, value in terms.items()}


def _add(total: Terms, terms: Terms) -> None:
    for name, value in terms.items():
        total[name] = total.get(name, 0.0) + value


def vision_terms(cfg: MM1Config, w: Workload, k: Kernels, num_images: int) -> Terms:
    """The ViT for ``num_images`` images: pixels, stem norms, all its layers."""
    v, par = cfg.model.vision, cfg.parallel
    tokens = vision_tokens_per_image(cfg.model, w)
    shape = vision_layer_shape(cfg.model, tokens_per_image=tokens, num_images=num_images)
    e = k.bytes_per_value
    pixels = pixel_values_per_image(cfg.model, w) * num_images
    terms: Terms = {"pixels": pixels * (w.pixel_bytes + (e if e != w.pixel_bytes else 0))}
    norm = (e * v.hidden_size + 2 * FP32 * k.norm_stats) * shape.tokens
    if v.pre_layernorm:
        terms["pre_layernorm"] = norm
    if v.post_layernorm:
        terms["post_layernorm"] = norm
    layer = transformer_layer_terms(
        shape,
        k,
        tp=par.tensor_parallel_size,
        sp=False,  # the ViT runs without sequence parallelism
        recompute=par.recompute,
        scores_kept=k.vision_scores_kept,
        output_copies=k.vision_output_copies,
        activation_copies=k.gelu_extra_copies,
    )
    _add(terms, _scaled(layer, v.num_layers))
    return terms


def _block_terms(in_width: int, width: int, positions: float, e: int, k: Kernels) -> float:
    """A C-Abstractor bottleneck block at ``positions`` (grid cells x images): 9 tensors
    of ``width`` (three norm inputs, three SiLU inputs, conv2 and conv3 inputs, the
    squeeze-excite product), one more with a projection shortcut, and norm statistics."""
    tensors = 9 + (1 if in_width != width else 0)
    stats = (3 + (1 if in_width != width else 0)) * 2 * FP32 * k.norm_stats
    return (tensors * e * width + stats) * positions


def connector_terms(cfg: MM1Config, w: Workload, k: Kernels, num_images: int) -> Terms:
    c, v = cfg.model.connector, cfg.model.vision
    e, llm_hidden = k.bytes_per_value, cfg.model.llm.hidden_size
    grid = patches_per_image(cfg.model, w.image_size) * num_images
    pooled = c.num_output_tokens * num_images
    readout = (c.num_readout_layers - 1) * 2 * e * llm_hidden * pooled  # GELU in and out
    if c.type == "c_abstractor":
        n = c.num_blocks_per_stage
        width = c.hidden_size if n else v.hidden_size
        stage1 = e * v.hidden_size * grid + e * width * grid * n  # block inputs + output
        stage2 = e * width * pooled * (n + 1)
        blocks = sum(
            _block_terms(v.hidden_size if i == 0 else width, width, grid, e, k) for i in range(n)
        )
        blocks += n * _block_terms(width, width, pooled, e, k)
        inputs = [v.hidden_size] + [width] * (2 * n - 1) if n else []
        squeeze = sum(2 * e * (width + max(1, c_in // 4)) for c_in in inputs) * num_images
        return {"blocks": stage1 + stage2 + blocks + squeeze, "readout": readout}
    if c.type == "avg_pool":
        return {"pool": e * v.hidden_size * (grid + pooled), "readout": readout}
    if c.type == "mlp":
        return {"features": e * v.hidden_size * grid, "readout": readout}
    # attn_pool: LayerNorm in and out, keys and values, queries, probabilities, output
    d = c.hidden_size
    attention = e * (2 * v.hidden_size + 2 * d) * grid + e * (2 * d) * pooled
    probabilities = e * c.num_attention_heads * grid * c.num_output_tokens
    return {"attention": attention + probabilities, "readout": readout}


def decoder_terms(
    cfg: MM1Config,
    w: Workload,
    k: Kernels,
    stage: Stage,
    micro: int,
    counted: Optional[CountedShare] = None,
) -> Terms:
    """The stage's decoder layers on ``w`` (one context-parallel rank's share of each
    sequence), as the gather-then-attend attention keeps them under CP."""
    par = cfg.parallel
    tp, sp = par.tensor_parallel_size, par.sequence_parallel
    shape = decoder_layer_shape(cfg.model, seq_length=w.seq_length, micro_batch=micro)
    flags = moe_layer_flags(cfg.model.llm)
    total: Terms = {}
    for index in stage.decoder_layers:
        moe = flags[index] and par.recompute != "full"
        layer = transformer_layer_terms(
            shape,
            k,
            tp=tp,
            sp=sp,
            recompute=par.recompute,
            scores_kept=k.decoder_scores_kept,
            output_copies=k.decoder_output_copies,
            rmsnorm=True,
            activation_copies=k.swiglu_extra_copies,
            mlp=not moe,
        )
        e = k.bytes_per_value
        _add(total, gathered_attention_terms(cfg, layer, e, w.seq_length, micro, counted))
        if moe:
            etp = par.expert_tensor_parallel_size or tp
            _add(total, moe_terms(cfg.model, k, tokens=shape.tokens, tp=tp, sp=sp, etp=etp))
    return total


def logits_terms(cfg: MM1Config, w: Workload, k: Kernels, micro: int) -> Terms:
    """Final norm and output-layer inputs, and the fp32 softmax Megatron-Core's
    vocab-parallel cross-entropy keeps (``[s, b, V / t]``); labels and loss mask."""
    par, llm = cfg.parallel, cfg.model.llm
    tokens = w.seq_length * micro
    outside = tokens / par.tensor_parallel_size if par.sequence_parallel else tokens
    e = k.bytes_per_value
    norm = (k.rmsnorm_copies * e * llm.hidden_size + FP32 * k.norm_stats) * outside
    return {
        "final_norm": norm,
        "output_input": e * llm.hidden_size * outside,
        "logits_fp32": FP32 * llm.vocab_size / par.tensor_parallel_size * tokens,
        "labels": (INT64 + 1) * tokens,
    }


def micro_batch_terms(
    cfg: MM1Config,
    w: Workload,
    k: Kernels,
    stage: Stage,
    counted: Optional[CountedShare] = None,
) -> Dict[str, Terms]:
    """Activations of one micro-batch on ``stage``, grouped by component; ``w`` is what
    one context-parallel rank runs (``context_parallel.rank_workload``)."""
    micro = cfg.training.micro_batch_size
    groups: Dict[str, Terms] = {}
    if stage.has_vision:
        num_images = w.images_per_sequence * micro
        if num_images:
            groups["vision_encoder"] = vision_terms(cfg, w, k, num_images)
            groups["connector"] = connector_terms(cfg, w, k, num_images)
        groups["embedding"] = {"token_ids": INT64 * w.seq_length * micro}
    groups["decoder"] = decoder_terms(cfg, w, k, stage, micro, counted)
    if stage.has_output:
        groups["logits"] = logits_terms(cfg, w, k, micro)
    return groups


def peak_moments(
    cfg: MM1Config, w: Workload, k: Kernels, stage: Stage, weight_bytes: int, largest: float
) -> Dict[str, Terms]:
    """What is alive beside the kept activations at the two moments that can be a stage's
    peak, both in the backward of its last in-flight micro-batch:

    - ``backward_start`` (the last stage): the cross-entropy has turned the fp32 softmax
      into the logits' gradient in place; with bf16 activations the bf16 logits are alive
      beside it, and the output layer's weight gradient is formed.
    - ``last_layer_mlp``: the logits, the final norm's and the output layer's tensors and
      the layer's own fc2 input have been freed; the gradients of fc2's input and of
      fc1's 2f-wide output (the SwiGLU backward) and of the residual stream (gathered to
      full length with SP) are alive, and the biggest weight's gradient is formed (or,
      with full recomputation, the layer's recomputed activations).
    """
    par, llm = cfg.parallel, cfg.model.llm
    micro, tp = cfg.training.micro_batch_size, par.tensor_parallel_size
    tokens = w.seq_length * micro
    e, ffn = k.bytes_per_value, llm.ffn_hidden_size
    moments: Dict[str, Terms] = {}
    if stage.has_output:
        vocab_shard = llm.vocab_size / tp
        start: Terms = {"output_weight_gradient": vocab_shard * llm.hidden_size * weight_bytes}
        if e != FP32:
            start["logits_bf16"] = e * vocab_shard * tokens
        moments["backward_start"] = start
    mlp: Terms = {
        "mlp_gradients": e * (3 * ffn * tokens / tp + llm.hidden_size * tokens),
        "freed_fc2_input": -e * ffn * tokens / tp,
        "weight_gradient": largest * weight_bytes,
    }
    if stage.has_output:
        logits = logits_terms(cfg, w, k, micro)
        mlp["freed_logits"] = -(sum(logits.values()) - logits["labels"])
    if par.recompute == "full":
        shape = decoder_layer_shape(cfg.model, seq_length=w.seq_length, micro_batch=micro)
        layer = transformer_layer_terms(
            shape,
            k,
            tp=tp,
            sp=par.sequence_parallel,
            recompute="none",
            scores_kept=k.decoder_scores_kept,
            output_copies=k.decoder_output_copies,
            rmsnorm=True,
            activation_copies=k.swiglu_extra_copies,
        )
        layer = gathered_attention_terms(cfg, layer, e, w.seq_length, micro, recomputing=True)
        mlp["recomputed_layer"] = sum(layer.values())
    moments["last_layer_mlp"] = mlp
    return moments
