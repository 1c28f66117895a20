"""A LoRA run's adapters as a PEFT adapter folder (``mm1 convert export --adapter``).

``adapter_model.safetensors`` names each factor by the module of the exported model it
adapts (``base_model.model.<module>.lora_A.weight``), with ``adapter_config.json``
(rank, alpha, dropout, the target modules by full name), so that

    base = AutoModelForImageTextToText.from_pretrained(exported_base)  # mm1 convert export
    model = PeftModel.from_pretrained(base, adapter_folder)

computes what our adapted model computes, where our package is not installed. Our fused
layers become several Hugging Face ones: ``linear_qkv`` is ``q_proj``, ``k_proj``,
``v_proj`` (and a gated ``linear_fc1`` is ``gate_proj`` and ``up_proj``); each gets ``A``
whole and its rows of ``B``, the rows its weight takes (``mapping.separate``), which is
exact because the layer's output is ``W x + s B A x`` row by row.

Not exportable as PEFT (merge them instead, the default export): adapters on MoE experts
(transformers keeps the experts of a layer in fused tensors, not per-expert linears),
and ``model.lora.fully_trained`` parts (PEFT would need them as ``modules_to_save``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import torch

from mm1_megatron.config import MM1Config
from mm1_megatron.conversion.errors import ConversionError
from mm1_megatron.conversion.export_layouts import CONNECTOR_PREFIX, format_names
from mm1_megatron.conversion.mapping import (
    language_attention_shape,
    language_units,
    separate,
    vision_attention_shape,
    vision_units,
)
from mm1_megatron.conversion.target_configs import TARGET_STYLES, language_target
from mm1_megatron.models.lora import adapted_stems

logger = logging.getLogger(__name__)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def check_peft_exportable(cfg: MM1Config, adapter_names: List[str], fmt: str) -> None:
    if fmt == "llava":  # transformers renames Llava's modules when it loads the weights
        raise ConversionError(
            "--adapter writes module names as the exported weights name them, and "
            "LlavaForConditionalGeneration's modules are named otherwise at run time, so "
            "PEFT would not find them; export the merged model, or --format mm1"
        )
    lora = cfg.model.lora
    if lora.fully_trained:
        raise ConversionError(
            f"model.lora.fully_trained={lora.fully_trained}: a PEFT adapter folder holds "
            "adapters only; export the merged model instead (without --adapter)"
        )
    experts = [n for n in adapter_names if ".experts." in n]
    if experts:
        raise ConversionError(
            f"{experts[0]} adapts an MoE expert, which transformers does not hold as a "
            "linear layer of its own; export the merged model instead (without --adapter)"
        )


def _units(cfg: MM1Config, fmt: str) -> Iterator[Tuple[list, object, str]]:
    """(rules, attention shape, Hugging Face prefix) of each unit the format exports."""
    names, model = format_names(fmt), cfg.model
    if names.vision_prefix is not None:
        shape = vision_attention_shape(model.vision)
        for _, rules in vision_units(model.vision, names.vision_prefix):
            yield rules, shape, ""
    if names.language_prefix is not None:
        shape = language_attention_shape(model.llm)
        style = TARGET_STYLES[language_target(model.llm)]
        for _, rules in language_units(model.llm, style):
            yield rules, shape, names.language_prefix


def _factor_pairs(module: str, a: torch.Tensor, b: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {
        f"{PEFT_PREFIX}{module}.lora_A.weight": a,
        f"{PEFT_PREFIX}{module}.lora_B.weight": b,
    }


def peft_tensors(source, cfg: MM1Config, fmt: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(PEFT name, tensor)`` for every adapter of ``source`` (a ``CheckpointTensors`` of
    the LoRA checkpoint's adapters), one unit at a time."""
    adapted = set(adapted_stems(source.names()))
    for rules, shape, prefix in _units(cfg, fmt):
        rules = [r for r in rules if r.megatron[: -len("weight")] in adapted]
        if not rules:
            continue
        stems = [r.megatron[: -len("weight")] for r in rules]
        factors = source.fetch([s + f for s in stems for f in ("lora_a", "lora_b")])
        for rule, stem in zip(rules, stems):
            a = factors[stem + "lora_a"]
            for name, b_rows in separate(rule, factors[stem + "lora_b"], shape).items():
                yield from _factor_pairs(prefix + name[: -len(".weight")], a, b_rows).items()
    rename = format_names(fmt).connector
    connector = sorted(s for s in adapted if s.startswith(CONNECTOR_PREFIX))
    if connector and rename is not None:
        factors = source.fetch([s + f for s in connector for f in ("lora_a", "lora_b")])
        for stem in connector:
            module = rename(stem[len(CONNECTOR_PREFIX) :] + "weight")[: -len(".weight")]
            a, b = factors[stem + "lora_a"], factors[stem + "lora_b"]
            yield from _factor_pairs(module, a, b).items()


def adapter_config(cfg: MM1Config, modules: List[str], base: str) -> Dict:
    """PEFT's ``LoraConfig`` as JSON; ``target_modules`` by full name (exact matches)."""
    lora = cfg.model.lora
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }


def write_peft_folder(folder: Path, tensors: Dict[str, torch.Tensor], config: Dict) -> None:
    from safetensors.torch import save_file

    # A fused layer's pieces share its A: each saved as a tensor of its own.
    save_file(
        {k: v.contiguous().clone() for k, v in tensors.items()}, str(folder / ADAPTER_WEIGHTS_FILE)
    )
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    logger.info(
        "wrote %d adapted modules (%d tensors) as a PEFT adapter",
        len(config["target_modules"]),
        len(tensors),
    )
