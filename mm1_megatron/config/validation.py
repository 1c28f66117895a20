"""Cross-field checks, run before anything is built.

Every problem is reported at once, each naming the field and what to change, so a user
fixes a config in one edit instead of one failed launch per mistake.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from collections import Counter
from typing import Iterator, Optional, Tuple

from mm1_megatron.config.check_errors import Errors as _Errors
from mm1_megatron.config.context_parallel_checks import check_context_parallel
from mm1_megatron.config.loader import choice_error
from mm1_megatron.config.logging_checks import check_logging
from mm1_megatron.config.model_checks import (
    FP8_TOKEN_MULTIPLE,
    check_connector,
    check_llm,
    check_model_impl,
    check_native_resolution_uses,
    check_vision,
    fp8_setting,
)
from mm1_megatron.config.post_training_checks import check_lora, check_preference
from mm1_megatron.config.schema import DATA_MIXTURE_SOURCES, MODEL_PARTS, MM1Config
from mm1_megatron.config.typecheck import key_choice_error


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


def _check_video(cfg: MM1Config, err: _Errors) -> None:
    d = cfg.data
    err.check(
        2 <= d.video.num_frames <= 21,
        f"data.video.num_frames={d.video.num_frames} must be in [2, 21] (frames per video)",
    )
    if d.mixture.get("video", 0) <= 0:
        return
    err.check(
        d.source == "synthetic",
        "data.mixture.video > 0 reads the synthetic world's clips; video shards are not "
        "supported yet: set data.source=synthetic or the video weight to 0",
    )
    per_clip = d.video.num_frames * (cfg.model.connector.num_output_tokens + 3) + 8
    err.check(
        d.video.num_frames <= d.max_images_per_sequence and per_clip <= cfg.training.seq_length,
        f"a {d.video.num_frames}-frame video ({per_clip} tokens with its markers and text) "
        f"must fit one sequence: data.max_images_per_sequence="
        f"{d.max_images_per_sequence} >= {d.video.num_frames} and training.seq_length="
        f"{cfg.training.seq_length} >= {per_clip}",
    )


def _check_data(cfg: MM1Config, err: _Errors) -> None:
    d = cfg.data
    for name, weight in d.mixture.items():
        err.check(
            name in DATA_MIXTURE_SOURCES,
            f"data.mixture.{name}: unknown source; use {', '.join(DATA_MIXTURE_SOURCES)}",
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
    for name in ("caption", "interleaved", "text", "conversation", "preference"):
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
    _check_video(cfg, err)
    image_weight = sum(
        d.mixture.get(name, 0)
        for name in ("interleaved", "caption", "conversation", "preference", "video")
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
        check_vision,
        check_connector,
        check_llm,
        _check_parallel,
        check_context_parallel,
        _check_optimizer_and_training,
        _check_data,
        _check_tiling_and_conversations,
        check_native_resolution_uses,
        check_model_impl,
        check_lora,
        check_preference,
        _check_checkpoint,
        _check_eval,
        check_logging,
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
    for tracker in ("wandb", "mlflow"):
        if getattr(cfg.logging, tracker).enabled and importlib.util.find_spec(tracker) is None:
            messages.append(
                f"logging.{tracker}.enabled=true but {tracker} is not installed: "
                f"`pip install -e .[{tracker}]`, or logging.{tracker}.enabled=false"
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
