"""Cross-field checks, run before anything is built.

Every problem is reported at once, each naming the field and what to change, so a user
fixes a config in one edit instead of one failed launch per mistake.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import typing
from collections import Counter
from typing import Iterator, List, Optional, Tuple

from mm1_megatron.config.loader import choice_error
from mm1_megatron.config.schema import MODEL_PARTS, MM1Config
from mm1_megatron.config.typecheck import key_choice_error


class _Errors:
    def __init__(self):
        self.messages: List[str] = []

    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.messages.append(message)

    def positive(self, obj, names, prefix: str) -> None:
        for name in names:
            value = getattr(obj, name)
            self.check(value > 0, f"{prefix}.{name}={value} must be > 0")


def _check_vision(cfg: MM1Config, err: _Errors) -> None:
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


def _check_native_resolution_uses(cfg: MM1Config, err: _Errors) -> None:
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


def _check_connector(cfg: MM1Config, err: _Errors) -> None:
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


def _check_llm(cfg: MM1Config, err: _Errors) -> None:
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


def _check_parallel(cfg: MM1Config, err: _Errors) -> None:
    par, m, v = cfg.parallel, cfg.model.llm, cfg.model.vision
    p = "parallel"
    err.positive(par, ["tensor_parallel_size", "pipeline_parallel_size", "expert_parallel_size"], p)
    tp = par.tensor_parallel_size
    if tp > 0:
        for name, heads in (
            ("model.llm", m.num_attention_heads),
            ("model.vision", v.num_attention_heads),
        ):
            err.check(
                heads % tp == 0,
                f"{name}.num_attention_heads={heads} is not divisible by "
                f"{p}.tensor_parallel_size={tp}",
            )
        groups = m.num_query_groups or m.num_attention_heads
        err.check(
            groups % tp == 0,
            f"model.llm.num_query_groups={groups} is not divisible by "
            f"{p}.tensor_parallel_size={tp}",
        )
    err.check(
        not par.sequence_parallel or tp > 1,
        f"{p}.sequence_parallel=true needs {p}.tensor_parallel_size > 1 "
        f"(or set sequence_parallel=false)",
    )
    _check_pipeline_split(cfg, err)
    ep = par.expert_parallel_size
    if ep > 1:
        err.check(
            m.moe.num_experts > 0,
            f"{p}.expert_parallel_size={ep} needs an MoE model (model.llm.moe.num_experts > 0)",
        )
    if m.moe.num_experts > 0 and tp > 1:
        err.check(
            par.sequence_parallel,
            f"an MoE model with {p}.tensor_parallel_size={tp} needs "
            f"{p}.sequence_parallel=true (Megatron-Core's MoE layers require it)",
        )
    if m.moe.num_experts > 0 and ep > 0:
        err.check(
            m.moe.num_experts % ep == 0,
            f"model.llm.moe.num_experts={m.moe.num_experts} is not divisible by "
            f"{p}.expert_parallel_size={ep}",
        )


def _check_pipeline_split(cfg: MM1Config, err: _Errors) -> None:
    par, num_layers = cfg.parallel, cfg.model.llm.num_layers
    pp = par.pipeline_parallel_size
    pinned = {
        "num_decoder_layers_on_vision_stage": par.num_decoder_layers_on_vision_stage,
        "num_decoder_layers_on_last_stage": par.num_decoder_layers_on_last_stage,
    }
    pinned = {name: value for name, value in pinned.items() if value is not None}
    if pp <= 0:
        return
    if pp == 1 and pinned:
        err.check(
            False,
            f"parallel.{next(iter(pinned))} needs parallel.pipeline_parallel_size "
            f"> 1 (or leave it unset)",
        )
        return
    for name, value in pinned.items():
        # Megatron-Core's TransformerConfig requires at least one layer on a pinned stage.
        err.check(
            value >= 1,
            f"parallel.{name}={value} must be >= 1: megatron-core needs at "
            f"least one decoder layer on that stage",
        )
    rest = num_layers - sum(pinned.values())
    free_stages = pp - len(pinned)
    if free_stages == 0:
        err.check(
            rest == 0,
            f"parallel.pipeline_parallel_size={pp} stages are all pinned but "
            f"hold {num_layers - rest} of model.llm.num_layers={num_layers}",
        )
        return
    hint = (
        (
            "; change one, or set parallel.num_decoder_layers_on_vision_stage / "
            "num_decoder_layers_on_last_stage for an uneven split"
        )
        if not pinned
        else ""
    )
    err.check(
        rest >= 0 and rest % free_stages == 0,
        f"model.llm.num_layers={num_layers} minus the pinned stages' "
        f"{num_layers - rest} leaves {rest} layers, which the other {free_stages} of "
        f"parallel.pipeline_parallel_size={pp} stages cannot share evenly{hint}",
    )


def _check_optimizer_and_training(cfg: MM1Config, err: _Errors) -> None:
    o, t = cfg.optimizer, cfg.training
    if o.lr_rule == "fixed":
        err.check(
            o.lr is not None and o.lr > 0,
            "optimizer.lr_rule=fixed needs optimizer.lr > 0 (or use lr_rule=mm1)",
        )
    err.check(0.0 <= o.min_lr_ratio <= 1.0, "optimizer.min_lr_ratio must be in [0, 1]")
    err.check(o.warmup_steps >= 0, "optimizer.warmup_steps must be >= 0")
    err.check(
        0.0 <= o.adam_beta1 < 1.0 and 0.0 <= o.adam_beta2 < 1.0,
        "optimizer.adam_beta1 and adam_beta2 must be in [0, 1)",
    )
    err.check(
        o.weight_decay >= 0 and o.clip_grad >= 0,
        "optimizer.weight_decay and optimizer.clip_grad must be >= 0",
    )
    for name, mult in o.lr_multipliers.items():
        err.check(
            name in MODEL_PARTS, key_choice_error("optimizer.lr_multipliers", name, MODEL_PARTS)
        )
        err.check(mult > 0, f"optimizer.lr_multipliers.{name}={mult} must be > 0")
    err.positive(
        t, ["train_steps", "global_batch_size", "micro_batch_size", "seq_length"], "training"
    )
    if t.micro_batch_size > 0:
        err.check(
            t.global_batch_size % t.micro_batch_size == 0,
            f"training.global_batch_size={t.global_batch_size} must be a multiple of "
            f"training.micro_batch_size={t.micro_batch_size}",
        )


def _check_data(cfg: MM1Config, err: _Errors) -> None:
    d = cfg.data
    for name, weight in d.mixture.items():
        err.check(
            name in ("interleaved", "caption", "text", "conversation"),
            f"data.mixture.{name}: unknown source; use interleaved, caption, text or conversation",
        )
        err.check(weight >= 0, f"data.mixture.{name}={weight} must be >= 0")
    err.check(sum(d.mixture.values()) > 0, "data.mixture needs at least one positive weight")
    err.check(d.max_images_per_sequence >= 0, "data.max_images_per_sequence must be >= 0")
    err.check(
        d.caption_window >= 1,
        f"data.caption_window={d.caption_window} must be >= 1 "
        f"(caption samples read per caption sequence)",
    )
    err.check(
        d.num_workers is None or d.num_workers >= 0,
        "data.num_workers must be >= 0 (or null: 2 with CUDA, 0 on CPU)",
    )
    err.check(d.images.dali_threads >= 1, "data.images.dali_threads must be >= 1")
    err.check(d.prefetch_factor >= 1, "data.prefetch_factor must be >= 1")
    if d.tokenizer.kind == "synthetic":
        err.check(
            d.tokenizer.path is None,
            "data.tokenizer.path is only read with "
            "data.tokenizer.kind=sentencepiece or huggingface; "
            "unset it",
        )
    else:
        err.check(
            bool(d.tokenizer.path),
            f"data.tokenizer.kind={d.tokenizer.kind} needs "
            f"data.tokenizer.path (a .model file or a tokenizer "
            f"folder)",
        )
    for name in ("caption", "interleaved", "text", "conversation"):
        listed, field_name = getattr(d.shards, name), f"data.shards.{name}"
        if d.source == "webdataset":
            err.check(
                not d.mixture.get(name, 0) > 0 or bool(listed),
                f"data.mixture.{name}={d.mixture.get(name)} but {field_name} is empty: "
                f"list its {'prefixes' if name == 'text' else 'shard manifests'} or set "
                f"the weight to 0",
            )
        else:
            err.check(
                not listed,
                f"{field_name} is only read with data.source=webdataset; "
                f"unset it or set data.source=webdataset",
            )
    image_weight = sum(
        d.mixture.get(name, 0) for name in ("interleaved", "caption", "conversation")
    )
    if image_weight > 0:
        err.check(
            d.max_images_per_sequence >= 1,
            "data.max_images_per_sequence must be >= 1 when the mixture has image sources",
        )
        tokens = cfg.model.connector.num_output_tokens
        err.check(
            tokens + 16 <= cfg.training.seq_length,
            f"training.seq_length={cfg.training.seq_length} cannot hold one image "
            f"({tokens} tokens) plus its caption; raise it or lower "
            f"model.connector.num_output_tokens",
        )


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


def _check_model_impl(cfg: MM1Config, err: _Errors) -> None:
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


def _check_checkpoint(cfg: MM1Config, err: _Errors) -> None:
    c = cfg.checkpoint
    err.check(c.save_interval >= 0, "checkpoint.save_interval must be >= 0")
    err.check(
        c.save_interval == 0 or c.save_dir is not None,
        "checkpoint.save_interval needs checkpoint.save_dir",
    )
    err.check(c.keep_last >= 1, "checkpoint.keep_last must be >= 1")
    err.check(c.keep_every >= 0, "checkpoint.keep_every must be >= 0")
    err.check(
        c.initial_weights is None
        or (c.pretrained_vision_encoder is None and c.pretrained_language_model is None),
        "checkpoint.initial_weights already sets every weight; unset "
        "checkpoint.pretrained_vision_encoder and checkpoint.pretrained_language_model",
    )
    for i, name in enumerate(cfg.model.freeze):
        err.check(name in MODEL_PARTS, choice_error(f"model.freeze[{i}]", name, MODEL_PARTS))
    err.check(cfg.training.max_nonfinite_steps >= 1, "training.max_nonfinite_steps must be >= 1")
    err.check(cfg.training.loss_spike_ratio > 1, "training.loss_spike_ratio must be > 1")
    err.check(
        cfg.parallel.collective_timeout_minutes > 0,
        "parallel.collective_timeout_minutes must be > 0",
    )


def _literal_fields(obj, prefix: str = "") -> Iterator[Tuple[str, object, tuple]]:
    """``(dotted path, value, choices)`` of every ``Literal`` field under ``obj``."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, tp = getattr(obj, f.name), hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _literal_fields(value, f"{path}.")
            continue
        if typing.get_origin(tp) is typing.Union and value is None:
            continue  # an Optional choice left unset
        if typing.get_origin(tp) is typing.Union:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) is typing.Literal:
            yield path, value, typing.get_args(tp)


def _check_choices(cfg: MM1Config, err: _Errors) -> None:
    """The schema's Literal choices, for configs built in code (the loader checks YAML)."""
    for path, value, choices in _literal_fields(cfg):
        err.check(value in choices, choice_error(path, value, choices))


def _check_eval(cfg: MM1Config, err: _Errors) -> None:
    e = cfg.eval
    err.check(e.interval >= 0, f"eval.interval={e.interval} must be >= 0 (0: never)")
    err.check(e.heldout_batches >= 0, f"eval.heldout_batches={e.heldout_batches} must be >= 0")
    err.check(
        e.limit is None or e.limit >= 1,
        f"eval.limit={e.limit} must be >= 1 (or null: every example)",
    )
    err.check(e.batch_size >= 1, f"eval.batch_size={e.batch_size} must be >= 1")
    err.check(
        bool(e.shots) and min(e.shots, default=0) >= 0,
        f"eval.shots={e.shots} needs at least one shot count, each >= 0",
    )
    for name in ("tasks", "shots"):
        repeated = [str(v) for v, n in Counter(getattr(e, name)).items() if n > 1]
        err.check(
            not repeated,
            f"eval.{name} lists {', '.join(repeated[:5])} more than once; list each once",
        )
    for name, default in (("num_beams", "3 for COCO/VQA"), ("max_new_tokens", "20 for captions")):
        value = getattr(e, name)
        err.check(
            value is None or value >= 1,
            f"eval.{name}={value} must be >= 1 (or null: per task, e.g. {default})",
        )
    if e.interval == 0:
        return
    if e.tasks:
        err.check(
            not cfg.parallel.sequence_parallel,
            "eval.tasks generate text, which sequence parallelism cannot split; set "
            "eval.tasks=[] and score checkpoints with mm1 eval, or "
            "parallel.sequence_parallel=false",
        )
        setting = fp8_setting(cfg)
        if setting is not None:
            field_name, value = setting
            err.check(
                False,
                f"eval.tasks={e.tasks} with {field_name}={value}: few-shot generation would "
                f"run the FP8 model, and its prompt prefill and decode token counts are not "
                f"padded to the {FP8_TOKEN_MULTIPLE} FP8 GEMMs need; set eval.tasks=[] (the "
                f"held-out loss still runs) and score the checkpoints with `mm1 eval "
                f"--checkpoint ...`, which evaluates them without FP8",
            )
    if cfg.data.source == "webdataset" and e.heldout_batches > 0:
        mixture = {name: w for name, w in cfg.data.mixture.items() if w > 0}
        missing = [name for name in mixture if not getattr(e.heldout_shards, name)]
        err.check(
            not missing,
            f"eval.heldout_shards.{{{','.join(missing)}}} are empty: a webdataset run's "
            f"held-out loss reads held-out shards of every source it trains on (or set "
            f"eval.heldout_batches=0)",
        )


def _check_tiling_and_conversations(cfg: MM1Config, err: _Errors) -> None:
    t, p = cfg.data.tiling, "data.tiling"
    err.positive(t, ["tile_size", "min_tiles", "max_tiles", "min_image_side"], p)
    err.check(
        len(t.static_grid) == 2 and min(t.static_grid) >= 1,
        f"{p}.static_grid={t.static_grid} must be [cols, rows], both >= 1 (MM1: [2, 2])",
    )
    err.check(
        t.min_tiles <= t.max_tiles,
        f"{p}.min_tiles={t.min_tiles} must be <= {p}.max_tiles={t.max_tiles}",
    )
    err.check(
        t.max_images_to_split >= 2,
        f"{p}.max_images_to_split={t.max_images_to_split} must be >= 2 (a sample with one "
        f"image is always split; MM1.5 stops splitting at 3)",
    )
    err.check(
        t.separator is None or (t.mode != "none" and t.separator.strip() != ""),
        f"{p}.separator={t.separator!r} is only used with {p}.mode static or dynamic, and "
        f"must be a non-empty token (or null)",
    )
    if t.mode != "none":
        err.check(
            cfg.data.source != "webdataset" or cfg.data.images.decoder == "pil",
            f"{p}.mode={t.mode} cuts tiles with the PIL decoder only: set "
            f"data.images.decoder=pil (DALI tiling is not written yet)",
        )
        patch = cfg.model.vision.patch_size
        err.check(
            t.tile_size % patch == 0,
            f"{p}.tile_size={t.tile_size} must be a multiple of model.vision.patch_size="
            f"{patch} (each tile is a patch grid)",
        )
    template = cfg.data.conversations.chat_template
    markers = [template.system, template.user, template.assistant, template.end_of_turn]
    err.check(
        all(markers) and len(set(markers)) == len(markers),
        f"data.conversations.chat_template markers must be distinct and non-empty: {markers}",
    )


def validate_config(cfg: MM1Config) -> MM1Config:
    """Raise ``ValueError`` listing every problem in ``cfg``; return it unchanged if none."""
    err = _Errors()
    for check in (
        _check_choices,
        _check_vision,
        _check_connector,
        _check_llm,
        _check_parallel,
        _check_optimizer_and_training,
        _check_data,
        _check_tiling_and_conversations,
        _check_native_resolution_uses,
        _check_model_impl,
        _check_checkpoint,
        _check_eval,
    ):
        check(cfg, err)
    if err.messages:
        raise ValueError("Invalid configuration:\n  - " + "\n  - ".join(err.messages))
    return cfg


def validate_environment(
    cfg: MM1Config, *, cuda_available: bool, cuda_capability: Optional[Tuple[int, int]] = None
) -> None:
    """Checks that depend on the machine: accelerators asked for must be present."""
    messages = []
    if cfg.model.fp8 is not None and cuda_capability is not None and cuda_capability < (8, 9):
        messages.append(
            f"model.fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, "
            f"Hopper); this GPU is {cuda_capability[0]}.{cuda_capability[1]}. "
            f"Set model.fp8=null"
        )
    te_installed = importlib.util.find_spec("transformer_engine") is not None
    if cfg.model.transformer_impl == "transformer_engine" and not te_installed:
        messages.append(
            "model.transformer_impl=transformer_engine but Transformer Engine is not "
            "installed: `pip install -e .[te]` on a CUDA machine, or set "
            "model.transformer_impl=local"
        )
    if cfg.model.fp8 is not None and not cuda_available:
        messages.append(
            "model.fp8 needs an NVIDIA GPU with FP8 support (Hopper or newer); "
            "set model.fp8=null to run on this machine"
        )
    if cfg.training.init_device == "gpu" and not cuda_available:
        messages.append(
            "training.init_device=gpu needs a GPU; use training.init_device=auto or cpu"
        )
    if cfg.training.precision == "bf16" and not cuda_available:
        messages.append(
            "training.precision=bf16 is GPU-only here; use training.precision=auto (fp32 on CPU)"
        )
    if messages:
        raise ValueError("Configuration does not fit this machine:\n  - " + "\n  - ".join(messages))
