"""Export an mm1_megatron checkpoint (any TP/PP/EP layout) to a Hugging Face folder.

    export_checkpoint(ExportRequest(checkpoint="runs/x/ckpt", output="exports/x"))

Formats: ``mm1`` (the whole model, ``MM1ForConditionalGeneration``, with its code:
it loads with ``trust_remote_code=True`` where our package is not installed), ``llava``
(``LlavaForConditionalGeneration``, MLP connector only, loads without this package),
``language-model`` (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` / ``MixtralForCausalLM`` /
``Qwen2MoeForCausalLM``) and ``vision-encoder`` (``CLIPVisionModel`` or, for a SigLIP
tower, ``SiglipVisionModel`` / ``Siglip2VisionModel`` (native resolution) without the
pooling head). The checkpoint is read one unit
(embedding, decoder layer, ...) at a time (``CheckpointTensors``) and written as
safetensors shards with an index, so memory holds one unit plus one shard, never the
whole model. Next to the shards: ``config.json``, tokenizer files, the image-processor
and generation configs, a model card with the training config and, for ``mm1``, the
model's code (``mm1_megatron/hf_model``). A run trained on conversations also gets its
chat template (``chat_template.py``), and an ``mm1`` export of a run with tiles a
processor that cuts them as training did (``mm1_processor.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mm1_megatron.config import load_config
from mm1_megatron.config.schema import MODEL_PARTS
from mm1_megatron.conversion import megatron_io
from mm1_megatron.conversion.adapter_source import MergedAdapterTensors, adapter_base_folder
from mm1_megatron.conversion.checkpoint_stream import CheckpointTensors
from mm1_megatron.conversion.errors import ConversionError
from mm1_megatron.conversion.export_layouts import (
    check_llava_compatible,
    format_config,
    format_tensors,
)
from mm1_megatron.conversion.hf_files import (
    write_generation_config,
    write_image_processor_config,
    write_model_card,
)
from mm1_megatron.conversion.output_folder import check_output_folder, staged_output
from mm1_megatron.conversion.peft_export import (
    PEFT_PREFIX,
    adapter_config,
    check_peft_exportable,
    peft_tensors,
    write_peft_folder,
)
from mm1_megatron.conversion.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    dtype_name,
    tensor_dtype,
)
from mm1_megatron.conversion.target_configs import (
    TARGET_CLASSES,
    VISION_CLASSES,
    language_target,
    vision_target,
)
from mm1_megatron.conversion.tokenizer_files import resolve_tokenizer, write_tokenizer

logger = logging.getLogger(__name__)

FORMAT_PARTS = {
    "mm1": MODEL_PARTS,
    "llava": MODEL_PARTS,
    "language-model": ("language_model",),
    "vision-encoder": ("vision_encoder",),
}
FORMATS = ("auto",) + tuple(FORMAT_PARTS)


@dataclass
class ExportRequest:
    checkpoint: Path
    output: Path
    format: str = "auto"
    dtype: str = "auto"  # auto: the imported source's dtype, else float32
    tokenizer: Optional[Path] = None  # a HF tokenizer folder replacing the checkpoint's
    overwrite: bool = False
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    base: Optional[Path] = None  # a LoRA checkpoint's base, where it has moved
    adapter: bool = False  # a LoRA checkpoint's adapters as a PEFT folder, not merged


def _choose_format(requested: str, parts) -> str:
    if requested not in FORMATS:
        raise ConversionError(f"--format {requested!r} is not one of {list(FORMATS)}")
    if requested == "auto":
        if set(FORMAT_PARTS["mm1"]) <= set(parts):
            return "mm1"
        if parts == ("language_model",):
            return "language-model"
        if parts == ("vision_encoder",):
            return "vision-encoder"
        raise ConversionError(
            f"the checkpoint holds {list(parts)}; choose --format language-model or vision-encoder"
        )
    missing = [p for p in FORMAT_PARTS[requested] if p not in parts]
    if missing:
        raise ConversionError(
            f"--format {requested} needs {missing}, which the checkpoint "
            f"does not hold (it has {list(parts)})"
        )
    return requested


def _choose_dtype(requested: str, info: Dict) -> str:
    if requested != "auto":
        return dtype_name(tensor_dtype(requested))
    dtypes = {source.get("dtype") for source in info.get("sources", {}).values()}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else "float32"


def _architecture(fmt: str, cfg) -> str:
    if fmt == "vision-encoder":
        return VISION_CLASSES[vision_target(cfg.model.vision)]
    return {"mm1": "MM1ForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}.get(
        fmt
    ) or TARGET_CLASSES[language_target(cfg.model.llm)]


def _qwen2_moe_note(llm) -> str:
    moe = llm.moe
    reasons = []
    if moe.layer_frequency > 1:
        reasons.append(f"MoE layers on every {moe.layer_frequency}-th layer (0, k, 2k, ...)")
    if moe.top_k == 1:
        reasons.append("top-1 routing")
    if not moe.renormalizes_top_k:
        reasons.append("top-k weights that are not renormalised (`norm_topk_prob: false`)")
    if llm.qkv_bias:
        reasons.append("q/k/v biases")
    return (
        f"The decoder has {', '.join(reasons) or 'MoE layers'}, so it is exported as "
        "`Qwen2MoeForCausalLM`: the standard class whose layers can each be dense "
        "(`mlp_only_layers`, own `intermediate_size`) or MoE, with plain RoPE attention, "
        "optional q/k/v biases and softmax top-k routing, renormalised or not. Its shared "
        "expert has width 0 and adds exactly zero."
    )


def _model_card_notes(fmt: str, cfg) -> str:
    notes = []
    if fmt != "vision-encoder" and language_target(cfg.model.llm) == "qwen2_moe":
        notes.append(_qwen2_moe_note(cfg.model.llm))
    if fmt != "vision-encoder" and _trained_on_conversations(cfg):
        notes.append(
            "The tokenizer carries the run's chat template (`chat_template.jinja`): "
            "`tokenizer.apply_chat_template(messages)` gives the token ids training used, "
            "and with `add_generation_prompt=True` ends with the assistant marker. Answers "
            f"end with `{cfg.data.conversations.chat_template.end_of_turn}`, where "
            "`generate()` stops (`generation_config.json`)."
        )
    if fmt == "mm1" and cfg.data.tiling.mode != "none":
        tiling = cfg.data.tiling
        notes.append(
            "`AutoProcessor.from_pretrained(path, trust_remote_code=True)` cuts images into "
            f"the tiles training used ({tiling.mode}, {tiling.tile_size} px) and expands each "
            "`<image>` of a prompt into one run of image tokens per tile: "
            '`model.generate(**processor(text=prompt, images=images, return_tensors="pt"))`.'
        )
    if fmt == "mm1" and cfg.model.vision.native_resolution:
        notes.append(
            "The vision tower is a `Siglip2VisionModel` (SigLIP 2 NaFlex): images keep "
            "their aspect ratio, each resized to at most "
            f"{cfg.model.vision.max_patches} patches by `Siglip2ImageProcessor`. Pass the "
            "processor's `pixel_values`, `pixel_attention_mask` and `spatial_shapes` to the "
            "model: `model.generate(**processor(text=prompt, images=images, "
            'return_tensors="pt"))`.'
        )
    if fmt == "mm1":
        notes.append(
            '`pipeline("image-text-to-text", model=path, trust_remote_code=True)` runs the '
            "model with its processor (`MM1Processor`, which expands each `<image>` marker "
            "into the image tokens training used)."
        )
    return "\n\n".join(notes)


def _load_extras(step: Path) -> Dict[str, torch.Tensor]:
    path = megatron_io.extras_path(step)
    if path is None:
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def _trained_on_conversations(cfg) -> bool:
    """A fine-tuning run (SFT or DPO): its exported tokenizer carries the chat template."""
    return any(cfg.data.mixture.get(name, 0) > 0 for name in ("conversation", "preference"))


def _write_side_files(
    folder: Path, fmt: str, cfg, tokenizer, special, step: Path, dtype: str
) -> None:
    chat = cfg.data.conversations.chat_template if _trained_on_conversations(cfg) else None
    if tokenizer is not None:
        separator = cfg.data.tiling.separator if cfg.data.tiling.mode != "none" else None
        write_tokenizer(
            tokenizer, folder, chat_template=chat, special_tokens=[separator] if separator else []
        )
    if special is not None:
        stops = []
        if chat is not None and tokenizer is not None:  # answers end with the end-of-turn
            from mm1_megatron.conversion.chat_template import marker_ids

            stops = [marker_ids(chat, tokenizer.tokenizer)[chat.end_of_turn]]
        write_generation_config(folder, special, extra_stop_ids=stops)
    tiled = cfg.data.tiling.mode != "none"
    if fmt == "mm1":  # MM1Processor with MM1ImageProcessor (tiles), CLIP's or Siglip2's
        from mm1_megatron.conversion.mm1_processor import write_mm1_processor

        write_mm1_processor(folder, cfg)
    elif fmt != "language-model":
        write_image_processor_config(folder, cfg.model.vision)
        if tiled:
            logger.warning(
                "the run tiles its images (data.tiling.mode=%s) but a %s export's image "
                "processor does not; export with --format mm1 for training's tiles",
                cfg.data.tiling.mode,
                fmt,
            )
    if fmt == "mm1":  # the code config.json's auto_map names
        from mm1_megatron.hf_model import write_model_code

        write_model_code(folder)
    if fmt == "llava":
        from mm1_megatron.conversion.llava_processor import write_llava_processor

        write_llava_processor(folder, cfg)
    write_model_card(
        folder,
        fmt=fmt,
        cfg=cfg,
        step_folder=step,
        architecture=_architecture(fmt, cfg),
        dtype=dtype,
        notes=_model_card_notes(fmt, cfg),
        special=special,
    )


def _tokenizer_and_special_ids(request: ExportRequest, cfg, step: Path, needed):
    """The tokenizer to ship and the special ids for the configs. A language model imported
    without a tokenizer is exported without one, with the source's own special ids."""
    if "language_model" not in needed:
        return None, None
    info = megatron_io.read_conversion_info(step)
    source = info.get("sources", {}).get("language_model")
    if request.tokenizer is None and source and not info["vocabulary"]["special_ids"]:
        logger.warning(
            "%s was imported without a tokenizer: no tokenizer files are written "
            "(pass --tokenizer to add one)",
            step,
        )
        return None, {
            "bos": source["bos_token_id"],
            "eos": source["eos_token_id"],
            "pad": source["pad_token_id"],
        }
    tokenizer = resolve_tokenizer(cfg, request.tokenizer)
    return tokenizer, tokenizer.special_ids()


def _inputs(request: ExportRequest, step: Path, cfg) -> List[Optional[Path]]:
    """Everything the export reads, which its output may not touch: the checkpoint, the
    step folder ``latest`` names and the tokenizer (``--tokenizer`` or the run's)."""
    tokenizer = cfg.data.tokenizer
    run_tokenizer = (
        Path(tokenizer.path) if tokenizer.kind != "synthetic" and tokenizer.path else None
    )
    return [request.checkpoint, step, request.tokenizer, run_tokenizer]


def export_checkpoint(request: ExportRequest) -> Path:
    """Write the Hugging Face folder; returns its path. A LoRA run's checkpoint exports
    merged into its base (``adapter_source.py``)."""
    step = megatron_io.resolve_step_folder(request.checkpoint)
    cfg = load_config(step / "config.yaml")
    lora = cfg.model.lora.enabled
    if request.adapter:
        return export_adapter(request, step, cfg)
    # What the base holds (parts, import records, extras); a plain checkpoint is its own.
    data_step = adapter_base_folder(step, request.base) if lora else step
    inputs = _inputs(request, step, cfg) + ([data_step] if lora else [])
    check_output_folder(request.output, overwrite=request.overwrite, inputs=inputs)
    with megatron_io.single_process_world():
        parts = megatron_io.parts_in_checkpoint(data_step)
        fmt = _choose_format(request.format, parts)
        if fmt == "llava":
            check_llava_compatible(cfg)
        dtype = _choose_dtype(request.dtype, megatron_io.read_conversion_info(data_step))
        needed = FORMAT_PARTS[fmt]
        tokenizer, special = _tokenizer_and_special_ids(request, cfg, data_step, needed)
        image_token_id = (special or {}).get("image") or 0
        if lora:
            source = MergedAdapterTensors(
                step, data_step, cfg.model, needed, image_token_id=image_token_id
            )
        else:
            source = CheckpointTensors(step, cfg.model, needed, image_token_id=image_token_id)
        logger.info("exporting %s of %s as %s (%s)", " + ".join(needed), step, fmt, dtype)
        with staged_output(
            request.output, overwrite=request.overwrite, command="export", inputs=inputs
        ) as staging:
            format_config(fmt, cfg, special, dtype).save_pretrained(str(staging))
            writer = ShardedSafetensorsWriter(staging, max_shard_bytes=request.max_shard_bytes)
            for name, tensor in format_tensors(
                fmt, source, cfg, dtype=tensor_dtype(dtype), extras=_load_extras(data_step)
            ):
                writer.add(name, tensor)
            writer.close()
            logger.info(
                "wrote %.2f GB; the largest unit read at once was %.2f GB",
                writer.total_bytes / 1e9,
                source.largest_fetch_bytes / 1e9,
            )
            _write_side_files(staging, fmt, cfg, tokenizer, special, step, dtype)
    logger.info("exported %s to %s", fmt, request.output)
    return Path(request.output)


def export_adapter(request: ExportRequest, step: Path, cfg) -> Path:
    """A LoRA checkpoint's adapters as a PEFT adapter folder (``peft_export.py``), for the
    base exported with the same ``--format``."""
    from mm1_megatron.models.lora import is_adapter_key

    if not cfg.model.lora.enabled:
        raise ConversionError(
            f"{step} is not a LoRA checkpoint (model.lora.rank=0): --adapter exports adapters"
        )
    base_step = adapter_base_folder(step, request.base)
    inputs = [request.checkpoint, step, base_step]
    check_output_folder(request.output, overwrite=request.overwrite, inputs=inputs)
    with megatron_io.single_process_world():
        fmt = _choose_format(request.format, megatron_io.parts_in_checkpoint(base_step))
        dtype = _choose_dtype(request.dtype, megatron_io.read_conversion_info(base_step))
        source = CheckpointTensors(
            step, cfg.model, FORMAT_PARTS[fmt], image_token_id=0, select=is_adapter_key
        )
        check_peft_exportable(cfg, source.names(), fmt)
        with staged_output(
            request.output, overwrite=request.overwrite, command="export", inputs=inputs
        ) as staging:
            tensors = {
                name: tensor.to(tensor_dtype(dtype))
                for name, tensor in peft_tensors(source, cfg, fmt)
            }
            suffix = ".lora_A.weight"
            modules = [n[len(PEFT_PREFIX) : -len(suffix)] for n in tensors if n.endswith(suffix)]
            write_peft_folder(staging, tensors, adapter_config(cfg, modules, str(base_step)))
    logger.info("exported the adapters of %s for a %s export of %s", step, fmt, base_step)
    return Path(request.output)
