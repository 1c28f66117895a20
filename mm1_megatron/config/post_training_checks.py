"""Config checks of post-training: LoRA adapters (``model.lora``). Run by
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
    moe = cfg.model.llm.moe
    expert_targets = {"linear_fc1", "linear_fc2"} & set(lora.target_modules)
    err.check(
        not (
            moe.num_experts > 0
            and moe.grouped_gemm
            and expert_targets
            and "language_model" in lora.parts
        ),
        f"{p} cannot adapt grouped-GEMM experts: set model.llm.moe.grouped_gemm=false, or "
        f"leave linear_fc1/linear_fc2 out of {p}.target_modules",
    )
    c = cfg.checkpoint
    err.check(
        c.save_dir is None or c.initial_weights is not None,
        f"{p}.rank > 0 with checkpoint.save_dir: LoRA checkpoints hold the adapters only, "
        "so set checkpoint.initial_weights to the base model's checkpoint",
    )
