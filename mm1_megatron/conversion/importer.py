"""Import Hugging Face weights into an mm1_megatron checkpoint.

    import_checkpoint(ImportRequest(output="ckpts/llama", language_model="hf/llama"))

writes ``output/step_00000000/`` (``model_optim/`` dist checkpoint of the imported parts,
``config.yaml``, ``conversion.json``, ``manifest.json``) and ``output/latest``. Training
runs read it with ``checkpoint.pretrained_language_model`` /
``checkpoint.pretrained_vision_encoder`` at any TP/PP/EP layout. The connector is never
imported: it starts fresh in the training run.
"""

from __future__ import annotations

import errno
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from mm1_megatron.checkpoint import layout
from mm1_megatron.config import MM1Config, load_config, save_config
from mm1_megatron.config.schema import MoEConfig
from mm1_megatron.conversion import megatron_io
from mm1_megatron.conversion.errors import ConversionError, unsupported
from mm1_megatron.conversion.mapping import (
    LANGUAGE_PREFIX,
    QWEN2_MOE_STYLE,
    language_attention_shape,
    language_units,
    moe_layer_flags,
    vision_attention_shape,
    vision_post_layernorm_names,
    vision_units,
)
from mm1_megatron.conversion.output_folder import check_output_folder, staged_output
from mm1_megatron.conversion.safetensors_io import SafetensorsFolder, dtype_name, save_tensors
from mm1_megatron.conversion.source_configs import language_source, vision_source
from mm1_megatron.conversion.tensor_copy import check_all_consumed, fill_from_hf
from mm1_megatron.conversion.vocab import VocabularyPlan, has_tokenizer_files, plan_vocabulary

logger = logging.getLogger(__name__)


@dataclass
class ImportRequest:
    output: Path
    language_model: Optional[Path] = None  # a Llama / Mistral / Qwen2 / Qwen3 / MoE folder
    vision_encoder: Optional[Path] = None  # a CLIP / SigLIP / SigLIP 2 (vision) model folder
    # YAML for the parts not imported (e.g. the connector): one file, or several stacked
    base_config: Union[Path, Sequence[Path], None] = None
    overrides: Sequence[str] = ()
    tokenizer: Optional[Path] = None  # default: the language model folder, if it has one
    vocab_size: Optional[int] = None
    vocab_multiple: int = 1
    overwrite: bool = False
    seed: int = 1234


def _shared_expert_names(index: int) -> List[str]:
    block = f"model.layers.{index}.mlp"
    return [f"{block}.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")] + [
        f"{block}.shared_expert_gate.weight"
    ]


def _check_no_shared_experts(reader: SafetensorsFolder, cfg: MM1Config) -> List[str]:
    """Qwen2-MoE shared experts are accepted only when they contribute exactly zero."""
    names = []
    for index, is_moe in enumerate(moe_layer_flags(cfg.model.llm)):
        if not is_moe:
            continue
        layer_names = [n for n in _shared_expert_names(index) if n in reader]
        down = f"model.layers.{index}.mlp.shared_expert.down_proj.weight"
        if down in reader and reader.get(down).count_nonzero() > 0:
            raise unsupported(
                "shared expert",
                down,
                "Our MoE layers have routed experts only; "
                "a Qwen2-MoE shared expert must be zero (as in our exports).",
            )
        names += layer_names
    return names


def _import_language_model(
    state, request: ImportRequest, cfg: MM1Config, style: str, plan: VocabularyPlan
) -> None:
    reader = SafetensorsFolder(request.language_model)
    llm = cfg.model.llm
    grown = {f"{LANGUAGE_PREFIX}embedding.word_embeddings.weight": plan.source_size}
    if not llm.tie_embeddings:
        grown[f"{LANGUAGE_PREFIX}output_layer.weight"] = plan.source_size
    consumed = fill_from_hf(
        state,
        language_units(llm, style),
        reader,
        language_attention_shape(llm),
        label="language model",
        grown=grown,
    )
    if style == QWEN2_MOE_STYLE:
        consumed.update(_check_no_shared_experts(reader, cfg))
    if llm.tie_embeddings:
        consumed.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    check_all_consumed(reader, consumed)


def _import_vision_encoder(
    state, request: ImportRequest, cfg: MM1Config, info: Dict
) -> Dict[str, torch.Tensor]:
    """Copies the ViT; returns CLIP's post-LayerNorm (kept for export) by exported name.
    SigLIP's attention-pooling head (``head.*``) is not part of our ViT and is dropped."""
    reader = SafetensorsFolder(request.vision_encoder)
    vision = cfg.model.vision
    anchor = (
        "embeddings.class_embedding"
        if vision.use_class_token
        else "embeddings.patch_embedding.weight"
    )
    prefix = reader.find_prefix(anchor)
    if prefix is None:
        kind = "a CLIP" if vision.use_class_token else "a SigLIP"
        raise ConversionError(
            f"{request.vision_encoder} has no {anchor}; is it {kind} vision tower?"
        )
    consumed = fill_from_hf(
        state,
        vision_units(vision, prefix),
        reader,
        vision_attention_shape(vision),
        label="vision encoder",
    )
    extras = {}
    if vision.post_layernorm:
        head = [name for name in reader.keys() if name.startswith(f"{prefix}head.")]
        if head:
            consumed.update(head)
            warning = (
                "the SigLIP attention-pooling head (head.*) is not imported: MM1 uses "
                "the per-token features; an export writes the vision model without it"
            )
            logger.warning("%s", warning)
            info["warnings"].append(warning)
    else:
        for ours, theirs in zip(vision_post_layernorm_names(), vision_post_layernorm_names(prefix)):
            if theirs in reader:
                extras[ours] = reader.get(theirs)
                consumed.add(theirs)
    check_all_consumed(reader, consumed, scope=prefix)
    return extras


def _with_training_settings(
    source: MoEConfig, configured: MoEConfig, *, from_config: bool
) -> MoEConfig:
    """The source's experts and routing, with ``--config``'s training settings (loss
    coefficients, dispatcher, grouped GEMM) when one is given: a recipe's choices win
    over the source's ``router_aux_loss_coef``, which is kept without one."""
    if not source.num_experts or not from_config:
        return source
    return replace(
        source,
        aux_loss_coeff=configured.aux_loss_coeff,
        z_loss_coeff=configured.z_loss_coeff,
        token_dispatcher=configured.token_dispatcher,
        grouped_gemm=configured.grouped_gemm,
    )


def _language_part(request: ImportRequest, cfg: MM1Config, info: Dict):
    """Puts the source's decoder (vocabulary grown) into ``cfg``; returns (style, plan)."""
    source = language_source(request.language_model)
    tokenizer = request.tokenizer
    if tokenizer is None and has_tokenizer_files(request.language_model):
        tokenizer = request.language_model
    try:
        plan = plan_vocabulary(
            source.llm.vocab_size,
            tokenizer_path=tokenizer,
            vocab_size=request.vocab_size,
            multiple=request.vocab_multiple,
        )
    except ConversionError:
        raise
    except Exception as exc:  # tokenizers / transformers errors for damaged files vary
        raise ConversionError(
            f"cannot load the tokenizer in {tokenizer} ({type(exc).__name__}: {exc}); pass "
            f"--tokenizer with a working Hugging Face tokenizer folder"
        ) from None
    cfg.model.llm = replace(
        source.llm,
        vocab_size=plan.target_size,
        moe=_with_training_settings(
            source.llm.moe, cfg.model.llm.moe, from_config=request.base_config is not None
        ),
    )
    if plan.tokenizer_path is not None:
        cfg.data.tokenizer.kind, cfg.data.tokenizer.path = "huggingface", plan.tokenizer_path
    info["sources"]["language_model"] = {
        "path": str(Path(request.language_model).resolve()),
        "model_type": source.model_type,
        "dtype": dtype_name(SafetensorsFolder(request.language_model).dtype()),
        "bos_token_id": source.bos_token_id,
        "eos_token_id": source.eos_token_id,
        "pad_token_id": source.pad_token_id,
    }
    info["vocabulary"] = {
        "source_size": plan.source_size,
        "size": plan.target_size,
        "new_rows_init": "mean of the source rows",
        "added_tokens": plan.added_tokens,
        "special_ids": plan.special_ids,
    }
    info["warnings"] += source.warnings
    return source.style, plan


def _resolve_config(request: ImportRequest):
    """The checkpoint's config (``--config`` with the imported parts' shapes), the parts,
    ``conversion.json``'s content, the decoder's naming style and the vocabulary plan."""
    cfg = load_config(request.base_config, list(request.overrides))
    parts, info = [], {"format_version": 1, "parts": [], "sources": {}, "warnings": []}
    style = plan = None
    if request.vision_encoder is not None:
        vision = vision_source(request.vision_encoder)
        if vision.native_resolution and cfg.model.vision.native_resolution:
            # The patch budget per image is a training choice: a native-resolution
            # recipe's wins over the source processor's max_num_patches.
            budget = cfg.model.vision.max_patches
            if budget != vision.max_patches:
                info["warnings"].append(
                    f"model.vision.max_patches={budget} from --config, not the source "
                    f"processor's max_num_patches={vision.max_patches}"
                )
            vision = replace(vision, max_patches=budget)
        cfg.model.vision = vision
        parts.append("vision_encoder")
        info["sources"]["vision_encoder"] = {
            "path": str(Path(request.vision_encoder).resolve()),
            "dtype": dtype_name(SafetensorsFolder(request.vision_encoder).dtype()),
        }
    if request.language_model is not None:
        style, plan = _language_part(request, cfg, info)
        parts.append("language_model")
    if not parts:
        raise ConversionError("nothing to import: give a language model and/or a vision encoder")
    info["parts"] = parts
    for warning in info["warnings"]:
        logger.warning("%s", warning)
    return cfg, parts, info, style, plan


def _inputs(request: ImportRequest) -> List[Optional[Path]]:
    """Everything the import reads, which its output may not touch."""
    if request.tokenizer is not None and not Path(request.tokenizer).is_dir():
        raise ConversionError(f"--tokenizer {request.tokenizer} is not a folder")
    configs = request.base_config
    configs = [configs] if configs is None or isinstance(configs, (str, Path)) else list(configs)
    return [request.language_model, request.vision_encoder, request.tokenizer, *configs]


def import_checkpoint(request: ImportRequest) -> Path:
    """Convert the requested Hugging Face parts; returns the output save folder."""
    inputs = _inputs(request)
    check_output_folder(request.output, overwrite=request.overwrite, inputs=inputs)
    cfg, parts, info, style, plan = _resolve_config(request)
    image_token_id = plan.special_ids.get("image", 0) if plan is not None else 0
    build_cfg = megatron_io.placeholder_model_config(cfg.model, parts)
    with megatron_io.single_process_world():
        model = megatron_io.build_tp1_model(
            build_cfg, image_token_id=image_token_id, seed=request.seed
        )
        state = megatron_io.state_of(model)
        extras = {}
        if "language_model" in parts:
            _import_language_model(state, request, cfg, style, plan)
        if "vision_encoder" in parts:
            extras = _import_vision_encoder(state, request, cfg, info)
        with staged_output(
            request.output, overwrite=request.overwrite, command="import", inputs=inputs
        ) as staging:
            step = staging / layout.checkpoint_name(0)
            try:
                megatron_io.save_parts(model, step, parts)
            except BaseException as exc:  # torch's CheckpointException is a BaseException
                # dist_checkpointing reports its writers' OSErrors (a full disk) as text.
                os_error = re.search(r"\[Errno \d+\][^\n]*", str(exc))
                if os_error is None or isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise OSError(errno.EIO, os_error.group(0), str(step)) from None
            save_config(cfg, step / "config.yaml")
            if extras:
                save_tensors(
                    {k: v.contiguous() for k, v in extras.items()}, step / megatron_io.EXTRAS_FILE
                )
            (step / megatron_io.CONVERSION_FILE).write_text(json.dumps(info, indent=1) + "\n")
            megatron_io.write_published_checkpoint(staging, step.name)
    logger.info("imported %s into %s", " and ".join(parts), request.output)
    return Path(request.output)
