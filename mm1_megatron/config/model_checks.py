"""Config checks of the model: the ViT (and native resolution), the connector, the
decoder, FP8 and the implementation. Run by ``validate_config`` (``validation.py``)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

from mm1_megatron.config.check_errors import Errors as _Errors
from mm1_megatron.config.schema import MM1Config


def check_vision(cfg: MM1Config, err: _Errors) -> None:
    v = cfg.model.vision
    p = "model.vision"
    err.positive(
        v,
        [
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "ffn_hidden_size",
        ],
        p,
    )
    if v.patch_size > 0:
        err.check(
            v.image_size % v.patch_size == 0,
            f"{p}.image_size={v.image_size} must be a multiple of {p}.patch_size="
            f"{v.patch_size} (e.g. 378 with 14)",
        )
    if v.num_attention_heads > 0:
        err.check(
            v.hidden_size % v.num_attention_heads == 0,
            f"{p}.hidden_size={v.hidden_size} must be divisible by "
            f"{p}.num_attention_heads={v.num_attention_heads}",
        )
    for name in ("image_mean", "image_std"):
        err.check(
            len(getattr(v, name)) == v.num_channels,
            f"{p}.{name} needs one value per channel ({v.num_channels})",
        )
    if v.native_resolution:
        _check_native_resolution(v, p, err)


# SigLIP's stem, which SigLIP 2's NaFlex tower (the one native-resolution ViT) has.
NATIVE_RESOLUTION_STEM = {
    "use_class_token": False,
    "patch_embedding_bias": True,
    "pre_layernorm": False,
    "post_layernorm": True,
}


def _check_native_resolution(v, p: str, err: _Errors) -> None:
    wrong = {
        name: value for name, value in NATIVE_RESOLUTION_STEM.items() if getattr(v, name) != value
    }
    err.check(
        not wrong,
        f"{p}.native_resolution=true is SigLIP 2's NaFlex tower, with SigLIP's stem: set "
        + ", ".join(f"{p}.{name}={str(value).lower()}" for name, value in wrong.items())
        + f" (or {p}.native_resolution=false)",
    )
    err.check(
        v.max_patches > 0,
        f"{p}.max_patches={v.max_patches} must be > 0 (each image's patch budget, e.g. 256)",
    )


def check_native_resolution_uses(cfg: MM1Config, err: _Errors) -> None:
    """What native resolution (each image its own patch grid) does not go with."""
    if not cfg.model.vision.native_resolution:
        return
    on = "model.vision.native_resolution=true"
    err.check(
        cfg.data.tiling.mode == "none",
        f"data.tiling.mode={cfg.data.tiling.mode} with {on}: native resolution replaces "
        f"tiles (each image keeps its aspect ratio within model.vision.max_patches); set "
        f"data.tiling.mode=none",
    )
    err.check(
        cfg.data.source != "webdataset" or cfg.data.images.decoder == "pil",
        f"data.images.decoder={cfg.data.images.decoder} with {on}: the DALI pipeline gives "
        f"every image of a batch one size, not its own; set data.images.decoder=pil",
    )
    tokens = cfg.model.connector.num_output_tokens
    err.check(
        tokens <= cfg.model.vision.max_patches,
        f"model.connector.num_output_tokens={tokens} exceeds model.vision.max_patches="
        f"{cfg.model.vision.max_patches} with {on}: every image's tokens would be copies of "
        f"fewer patches; raise model.vision.max_patches or lower the token count",
    )
    err.check(
        cfg.model.connector.type != "mlp",
        f"model.connector.type=mlp with {on}: one token per patch cannot give every image "
        f"model.connector.num_output_tokens tokens; use c_abstractor, avg_pool or attn_pool",
    )


def check_connector(cfg: MM1Config, err: _Errors) -> None:
    c, v = cfg.model.connector, cfg.model.vision
    p = "model.connector"
    err.positive(c, ["num_output_tokens", "hidden_size", "num_readout_layers"], p)
    side = math.isqrt(max(c.num_output_tokens, 0))
    err.check(
        side * side == c.num_output_tokens,
        f"{p}.num_output_tokens={c.num_output_tokens} must be a square number "
        f"(64, 144, ...) so the tokens form a grid",
    )
    if v.patch_size > 0 and v.image_size % v.patch_size == 0:
        num_patches = (v.image_size // v.patch_size) ** 2
        err.check(
            c.num_output_tokens <= num_patches,
            f"{p}.num_output_tokens={c.num_output_tokens} exceeds the encoder's "
            f"{num_patches} patches; lower it or raise model.vision.image_size",
        )
        if c.type == "mlp":
            err.check(
                c.num_output_tokens == num_patches,
                f"{p}.type=mlp keeps every patch: set {p}.num_output_tokens={num_patches}",
            )
    if c.type == "attn_pool":
        err.check(c.num_attention_heads > 0, f"{p}.num_attention_heads must be > 0")
    if c.type == "attn_pool" and c.num_attention_heads > 0:
        err.check(
            c.hidden_size % c.num_attention_heads == 0,
            f"{p}.hidden_size={c.hidden_size} must be divisible by "
            f"{p}.num_attention_heads={c.num_attention_heads}",
        )
    if c.type == "c_abstractor":
        err.check(c.num_blocks_per_stage >= 0, f"{p}.num_blocks_per_stage must be >= 0")


def check_llm(cfg: MM1Config, err: _Errors) -> None:
    m = cfg.model.llm
    p = "model.llm"
    err.positive(
        m,
        [
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "ffn_hidden_size",
            "max_sequence_length",
        ],
        p,
    )
    if m.head_dim is not None:
        err.check(
            m.head_dim > 0 and m.head_dim % 2 == 0,
            f"{p}.head_dim={m.head_dim} must be a positive even number (RoPE rotates pairs), "
            f"or null for hidden_size / num_attention_heads",
        )
    elif m.num_attention_heads > 0:
        err.check(
            m.hidden_size % m.num_attention_heads == 0,
            f"{p}.hidden_size={m.hidden_size} must be divisible by "
            f"{p}.num_attention_heads={m.num_attention_heads} (or set {p}.head_dim)",
        )
    if m.num_query_groups is not None:
        err.check(
            m.num_query_groups > 0 and m.num_attention_heads % m.num_query_groups == 0,
            f"{p}.num_query_groups={m.num_query_groups} must divide "
            f"{p}.num_attention_heads={m.num_attention_heads}",
        )
    if m.rope_scaling_factor is not None:
        err.check(
            m.rope_scaling_factor > 0,
            f"{p}.rope_scaling_factor={m.rope_scaling_factor} must be > 0 (or null)",
        )
    err.check(
        cfg.training.seq_length <= m.max_sequence_length,
        f"training.seq_length={cfg.training.seq_length} exceeds "
        f"{p}.max_sequence_length={m.max_sequence_length}",
    )
    moe = m.moe
    if moe.num_experts > 0:
        q = f"{p}.moe"
        err.check(
            1 <= moe.top_k <= moe.num_experts,
            f"{q}.top_k={moe.top_k} must be between 1 and {q}.num_experts={moe.num_experts}",
        )
        err.check(
            not (moe.top_k == 1 and moe.normalize_top_k),
            f"{q}.normalize_top_k=true with {q}.top_k=1 gives every token's expert weight 1, "
            f"which Megatron-Core's router cannot train (a softmax over one logit); set "
            f"{q}.normalize_top_k to false or null",
        )
        err.check(
            1 <= moe.layer_frequency <= max(m.num_layers, 1),
            f"{q}.layer_frequency={moe.layer_frequency} must be between 1 and "
            f"{p}.num_layers={m.num_layers}",
        )
        err.check(
            moe.aux_loss_coeff >= 0 and moe.z_loss_coeff >= 0,
            f"{q}.aux_loss_coeff and {q}.z_loss_coeff must be >= 0",
        )
        # auto passes here and is checked again once resolved (config/machine.py, at start).
        err.check(
            not moe.grouped_gemm or cfg.model.transformer_impl != "local",
            f"{q}.grouped_gemm=true needs Transformer Engine's grouped linear layers: set "
            f"model.transformer_impl=transformer_engine, or {q}.grouped_gemm=null",
        )
    else:
        err.check(moe.num_experts == 0, f"{p}.moe.num_experts must be >= 0")


# Transformer Engine's FP8 GEMMs (cuBLASLt) need each dimension to be a multiple of 16
# bytes, i.e. 16 FP8 values. The tokens of a micro-batch are the contraction dimension of
# the weight-gradient GEMM, so their count must be divisible by 16 (TE asserts the forward's
# multiple of 8; Megatron-Core pads MoE expert tokens to the same 16 for this reason,
# megatron/core/fp8_utils.py get_fp8_align_size).
FP8_TOKEN_MULTIPLE = 16


def fp8_setting(cfg: MM1Config) -> Optional[Tuple[str, str]]:
    """``(dotted field, format)`` of the FP8 setting that is on or may turn on at start
    (``model.fp8`` or ``model.fp8_on_gpu``); None when neither is set."""
    if cfg.model.fp8 is not None:
        return "model.fp8", cfg.model.fp8
    if cfg.model.fp8_on_gpu is not None:
        return "model.fp8_on_gpu", cfg.model.fp8_on_gpu
    return None


def _check_fp8_tokens(cfg: MM1Config, err: _Errors, setting: Tuple[str, str]) -> None:
    field_name, value = setting
    t, par = cfg.training, cfg.parallel
    if min(t.seq_length, t.micro_batch_size, par.tensor_parallel_size) <= 0:
        return  # reported by the positivity checks
    split = par.tensor_parallel_size if par.sequence_parallel else 1
    multiple = FP8_TOKEN_MULTIPLE * split
    tokens = t.seq_length * t.micro_batch_size
    if tokens % multiple == 0:
        return
    step = multiple // math.gcd(multiple, t.micro_batch_size)
    nearest = max(step, t.seq_length // step * step)
    per_rank = (
        f" / parallel.tensor_parallel_size={split} (sequence parallelism splits them)"
        if split > 1
        else ""
    )
    err.check(
        False,
        f"{field_name}={value}: FP8 GEMMs need the tokens of a micro-batch on each rank, "
        f"training.seq_length={t.seq_length} x training.micro_batch_size="
        f"{t.micro_batch_size}{per_rank}, to be a multiple of {FP8_TOKEN_MULTIPLE}; set "
        f"training.seq_length={nearest} (or another micro_batch_size), or {field_name}=null",
    )


def _check_fp8(cfg: MM1Config, err: _Errors) -> None:
    m = cfg.model
    if m.fp8 is not None:
        err.check(
            m.transformer_impl == "transformer_engine",
            "model.fp8 needs model.transformer_impl=transformer_engine (with "
            "transformer_impl=auto, use model.fp8_on_gpu: FP8 only where it can run)",
        )
        err.check(
            m.fp8_on_gpu is None,
            f"model.fp8={m.fp8} (always) and model.fp8_on_gpu={m.fp8_on_gpu} (on FP8 GPUs "
            f"only) are both set: keep one, and set the other to null",
        )
    if m.fp8_on_gpu is not None:
        err.check(
            m.transformer_impl != "local",
            f"model.fp8_on_gpu={m.fp8_on_gpu} never applies with "
            f"model.transformer_impl=local: set transformer_impl=auto (or "
            f"transformer_engine), or model.fp8_on_gpu=null",
        )
    setting = fp8_setting(cfg)
    if setting is None:
        return
    field_name, value = setting
    _check_fp8_tokens(cfg, err, setting)
    err.check(
        cfg.training.precision != "fp32",
        f"{field_name}={value} runs on bf16 compute (FP8 GEMMs between bf16 layers, fp32 "
        f"master weights in the optimizer); training.precision=fp32 is not supported with "
        f"it: set training.precision=auto (bf16 on GPU) or bf16, or {field_name}=null",
    )


def check_model_impl(cfg: MM1Config, err: _Errors) -> None:
    m = cfg.model
    _check_fp8(cfg, err)
    err.check(m.init_method_std > 0, "model.init_method_std must be > 0")
    p = cfg.parallel
    err.check(
        not p.overlap_param_gather or p.use_distributed_optimizer,
        "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true "
        "(it overlaps that optimizer's parameter all-gather)",
    )
    err.check(
        m.attention == "per_document" or m.transformer_impl == "local",
        "model.attention=dense_mask_reference (the test reference) runs on "
        "model.transformer_impl=local only; use model.attention=per_document",
    )
