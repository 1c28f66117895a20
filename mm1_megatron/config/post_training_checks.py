"""Config checks of post-training: LoRA adapters (``model.lora``) and preference tuning
(``training.objective=preference``, the ``preference`` section). Run by
``validate_config`` (``validation.py``)."""

from __future__ import annotations

from mm1_megatron.config.check_errors import Errors as _Errors
from mm1_megatron.config.loader import choice_error
from mm1_megatron.config.schema import LORA_TARGETS, MODEL_PARTS, MM1Config


def _check_names(err: _Errors, field: str, names, choices) -> None:
    for i, name in enumerate(names):
        err.check(name in choices, choice_error(f"{field}[{i}]", name, choices))
    repeated = sorted({n for n in names if list(names).count(n) > 1})
    err.check(not repeated, f"{field} names {', '.join(map(str, repeated))} twice")


def check_lora(cfg: MM1Config, err: _Errors) -> None:
    lora, p = cfg.model.lora, "model.lora"
    err.check(lora.rank >= 0, f"{p}.rank={lora.rank} must be >= 0 (0 switches LoRA off)")
    if not lora.enabled:
        err.check(
            not lora.fully_trained,
            f"{p}.fully_trained has no effect without adapters: set {p}.rank > 0, or use "
            "model.freeze to train only some parts",
        )
        return
    err.check(lora.alpha > 0, f"{p}.alpha={lora.alpha} must be > 0")
    err.check(0 <= lora.dropout < 1, f"{p}.dropout={lora.dropout} must be in [0, 1)")
    err.check(bool(lora.parts), f"{p}.parts is empty: name where adapters go (language_model)")
    _check_names(err, f"{p}.parts", lora.parts, MODEL_PARTS)
    _check_names(err, f"{p}.fully_trained", lora.fully_trained, MODEL_PARTS)
    _check_names(err, f"{p}.target_modules", lora.target_modules, LORA_TARGETS)
    both = sorted(set(lora.parts) & set(lora.fully_trained))
    err.check(
        not both,
        f"{', '.join(both)} is in both {p}.parts and {p}.fully_trained: a fully trained "
        "part needs no adapters; drop it from one",
    )
    frozen = sorted(set(cfg.model.freeze) & (set(lora.parts) | set(lora.fully_trained)))
    err.check(
        not frozen,
        f"model.freeze names {', '.join(frozen)}, which {p} trains; with LoRA every other "
        "weight is frozen already: leave model.freeze empty",
    )
    err.check(
        bool(lora.target_modules) or "connector" in lora.parts,
        f"{p}.target_modules is empty: no layer would get an adapter; name some of "
        f"{', '.join(LORA_TARGETS)}",
    )
    moe = cfg.model.llm.moe
    expert_targets = {"linear_fc1", "linear_fc2"} & set(lora.target_modules)
    grouped = moe.grouped_gemm is True or (
        moe.grouped_gemm is None and cfg.model.transformer_impl == "transformer_engine"
    )
    err.check(
        not (moe.num_experts > 0 and grouped and expert_targets and "language_model" in lora.parts),
        f"{p} cannot adapt grouped-GEMM experts: set model.llm.moe.grouped_gemm=false, or "
        f"leave linear_fc1/linear_fc2 out of {p}.target_modules",
    )
    par = cfg.parallel
    expert_tp = par.expert_tensor_parallel_size or par.tensor_parallel_size
    err.check(
        not (
            moe.num_experts > 0
            and expert_targets
            and "language_model" in lora.parts
            and expert_tp != par.tensor_parallel_size
        ),
        f"{p} on MoE experts needs parallel.expert_tensor_parallel_size equal to "
        f"parallel.tensor_parallel_size (got {expert_tp} and {par.tensor_parallel_size}): "
        "other expert splits are not tested with adapters; leave linear_fc1/linear_fc2 out "
        f"of {p}.target_modules or unset expert_tensor_parallel_size",
    )
    c = cfg.checkpoint
    err.check(
        c.save_dir is None or c.initial_weights is not None,
        f"{p}.rank > 0 with checkpoint.save_dir: LoRA checkpoints hold the adapters only, "
        "so set checkpoint.initial_weights to the base model's checkpoint",
    )


def check_preference(cfg: MM1Config, err: _Errors) -> None:
    pref, mixture = cfg.preference, cfg.data.mixture
    others = sorted(name for name, w in mixture.items() if w > 0 and name != "preference")
    if cfg.training.objective != "preference":
        err.check(
            not mixture.get("preference", 0) > 0,
            "data.mixture.preference > 0 needs training.objective=preference (DPO trains on "
            "pairs of answers, not on next tokens)",
        )
        return
    _check_a_pair_fits(cfg, err)
    err.check(
        mixture.get("preference", 0) > 0 and not others,
        f"training.objective=preference trains on preference pairs only: set data.mixture to "
        f"{{preference: 1.0}} (it has {', '.join(others) or 'no preference weight'}; an "
        "included config's weights stay unless set to 0)",
    )
    err.check(
        not (cfg.model.lora.enabled and cfg.model.lora.fully_trained),
        "training.objective=preference with model.lora.fully_trained: the reference model is "
        "the LoRA model with its adapters off, which would change as those parts train; "
        "leave model.lora.fully_trained empty (or train without LoRA)",
    )
    err.check(pref.beta > 0, f"preference.beta={pref.beta} must be > 0")
    err.check(pref.nll_weight >= 0, f"preference.nll_weight={pref.nll_weight} must be >= 0")
    err.check(
        0 <= pref.label_smoothing < 0.5,
        f"preference.label_smoothing={pref.label_smoothing} must be in [0, 0.5)",
    )
    err.check(
        pref.loss == "sigmoid" or pref.label_smoothing == 0,
        "preference.label_smoothing applies to preference.loss=sigmoid only; set it to 0",
    )
    c = cfg.checkpoint
    err.check(
        (c.save_dir is None and c.load_dir is None)
        or c.initial_weights is not None
        or cfg.model.lora.enabled,
        "training.objective=preference with checkpoint.save_dir or load_dir: set "
        "checkpoint.initial_weights (the reference model is the starting weights, which a "
        "resume must read again)",
    )
    err.check(
        cfg.eval.interval == 0 or cfg.eval.heldout_batches == 0,
        "training.objective=preference: the held-out loss of evaluation during training is "
        "a next-token loss; set eval.heldout_batches=0 (the few-shot tasks still run)",
    )


def _tiles_per_image(cfg: MM1Config) -> int:
    """Encoder inputs one image can become (its largest tile grid plus the overview)."""
    tiling = cfg.data.tiling
    if tiling.mode == "none":
        return 1
    grid = tiling.static_grid[0] * tiling.static_grid[1] if tiling.mode == "static" else 0
    grid = grid or tiling.max_tiles
    return grid + (tiling.overview != "none")


def _check_a_pair_fits(cfg: MM1Config, err: _Errors) -> None:
    """A pair counts its image for both answers: a sequence must hold two of them (an
    image-free pair always fits what a caption needs)."""
    tiles = _tiles_per_image(cfg)
    err.check(
        cfg.data.max_images_per_sequence >= 2 * tiles,
        f"data.max_images_per_sequence={cfg.data.max_images_per_sequence} cannot hold one "
        f"preference pair's images ({tiles} encoder inputs per image, counted for both "
        f"answers): raise it to at least {2 * tiles}",
    )
    image_tokens = 2 * tiles * cfg.model.connector.num_output_tokens
    err.check(
        image_tokens + 32 <= cfg.training.seq_length,
        f"training.seq_length={cfg.training.seq_length} cannot hold one preference pair "
        f"({image_tokens} image tokens for its two answers plus their text); raise it",
    )
