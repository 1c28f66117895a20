"""Our side of a conversion: a TP=1 ``MM1Model`` in one process, and checkpoint folders.

Megatron-Core ``dist_checkpointing`` reshards on load, so converting needs only one
layout: an import fills a TP=1 / EP=1 model and saves it (it then loads at any TP/PP/EP),
and an export reads a checkpoint of any layout by our TP=1 names, one unit at a time
(``checkpoint_stream``, from a meta-device model built here). Parts a conversion does
not touch (e.g. the ViT when importing only a language model) are built as tiny
placeholders and neither saved nor loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from mm1_megatron.checkpoint import layout
from mm1_megatron.checkpoint.key_layout import reconcile_with_checkpoint
from mm1_megatron.checkpoint.layout import MODEL_OPTIM_DIR
from mm1_megatron.config.schema import (
    MODEL_PARTS,
    ConnectorConfig,
    LanguageModelConfig,
    ModelConfig,
    ModelPart,
    ParallelConfig,
    VisionEncoderConfig,
)
from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)

CONVERSION_FILE = "conversion.json"
EXTRAS_FILE = "hf_extras.safetensors"


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """A one-process gloo world at TP=PP=EP=1 on the CPU, made here unless one already
    exists (and then torn down again). Conversion is CPU work: on a GPU host it opens no
    CUDA context (GPU 0 may be busy or in exclusive mode)."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state

    from mm1_megatron.parallel import init_distributed, shutdown_distributed

    created_world = not dist.is_initialized()
    if not created_world and dist.get_world_size() != 1:
        raise ConversionError(
            "conversion runs in one process; start it with plain python, not torchrun"
        )
    created_groups = not parallel_state.model_parallel_is_initialized()
    if created_world:
        os.environ.pop("MASTER_PORT", None)  # a fresh free port, not one a past world used
    if created_world or created_groups:
        init_distributed(ParallelConfig(launcher="none"), force_cpu=True)
    try:
        yield
    finally:
        if created_world:
            shutdown_distributed()
        elif created_groups:
            parallel_state.destroy_model_parallel()


def placeholder_model_config(model: ModelConfig, keep: Iterable[ModelPart]) -> ModelConfig:
    """``model`` with the parts not in ``keep`` shrunk to a few parameters."""
    keep = set(keep)
    vision = (
        model.vision
        if "vision_encoder" in keep
        else VisionEncoderConfig(
            image_size=14,
            patch_size=14,
            hidden_size=8,
            num_layers=1,
            num_attention_heads=1,
            ffn_hidden_size=8,
        )
    )
    llm = (
        model.llm
        if "language_model" in keep
        else LanguageModelConfig(
            vocab_size=8,
            hidden_size=8,
            num_layers=1,
            num_attention_heads=1,
            ffn_hidden_size=8,
            max_sequence_length=8,
        )
    )
    keep_connector = "connector" in keep or {"vision_encoder", "language_model"} <= keep
    connector = (
        model.connector
        if keep_connector
        else ConnectorConfig(
            type="mlp",
            num_output_tokens=(vision.image_size // vision.patch_size) ** 2,
            hidden_size=8,
            num_readout_layers=1,
        )
    )
    # Conversion runs on CPU with local layers: checkpoint keys are the same for both
    # implementations (``checkpoint/key_layout.py``), so a Transformer Engine / FP8 run
    # converts too; TE's grouped experts are read as sequential ones.
    return replace(
        model,
        vision=vision,
        connector=connector,
        llm=replace(llm, moe=replace(llm.moe, grouped_gemm=None)),
        freeze=[],
        transformer_impl="local",
        fp8=None,
        fp8_on_gpu=None,
    )


def build_tp1_model(
    model: ModelConfig,
    *,
    image_token_id: int,
    seed: int = 1234,
    params_dtype: torch.dtype = torch.float32,
):
    """An ``MM1Model`` on CPU at TP=1 (call inside ``single_process_world``)."""
    from mm1_megatron.models import RuntimeOptions, build_mm1_model
    from mm1_megatron.parallel import seed_everything

    seed_everything(seed)
    runtime = RuntimeOptions(params_dtype=params_dtype, use_cpu_initialization=True)
    model = build_mm1_model(
        model,
        ParallelConfig(launcher="none"),
        image_token_id=image_token_id,
        runtime=runtime,
        init_seed=seed,
    )
    return model.eval()


def _sharded_part(model, parts: Sequence[ModelPart]) -> Dict:
    prefixes = tuple(f"{part}." for part in parts)
    return {
        key: value for key, value in model.sharded_state_dict().items() if key.startswith(prefixes)
    }


def save_parts(model, folder: Path, parts: Sequence[ModelPart]) -> None:
    """A model-only ``dist_checkpointing`` folder with the tensors of ``parts``."""
    from megatron.core import dist_checkpointing

    target = Path(folder) / MODEL_OPTIM_DIR
    target.mkdir(parents=True)
    dist_checkpointing.save({"model": _sharded_part(model, parts)}, str(target))


def load_parts(model, step_folder: Path, parts: Sequence[ModelPart]) -> None:
    """Load ``parts`` from a checkpoint written at any layout into the TP=1 ``model``."""
    from megatron.core import dist_checkpointing

    folder = Path(step_folder) / MODEL_OPTIM_DIR
    request = {"model": _sharded_part(model, parts)}
    # Written with Transformer Engine layers or the old local MoE key layout: same tensors.
    reconcile_with_checkpoint(request, folder).log(Path(step_folder))
    loaded = dist_checkpointing.load(request, str(folder))["model"]
    result = model.load_state_dict(loaded, strict=False)
    prefixes = tuple(f"{part}." for part in parts)
    missing = [
        key
        for key in result.missing_keys
        if key.startswith(prefixes) and not key.endswith("_extra_state")
    ]
    if missing:
        raise ConversionError(f"{step_folder} lacks {len(missing)} tensors, e.g. {missing[0]}")


def resolve_step_folder(path) -> Path:
    """A save folder (its ``latest``), a step folder, or the ``model_optim`` inside one."""
    path = Path(path)
    if path.name == MODEL_OPTIM_DIR:
        path = path.parent
    latest = layout.read_latest(path) if path.is_dir() else None
    if latest is not None:
        path = latest
    if not (path / MODEL_OPTIM_DIR).is_dir():
        raise ConversionError(
            f"{path} is not an mm1_megatron checkpoint (no {MODEL_OPTIM_DIR}/ and no 'latest' file)"
        )
    if not (path / "config.yaml").is_file():
        raise ConversionError(f"{path} has no config.yaml; cannot tell the model's shapes")
    if (path / layout.MANIFEST_FILE).is_file():
        try:
            layout.verify_manifest(path)  # sizes and SHA-256 of every file
        except layout.CorruptCheckpointError as exc:
            raise ConversionError(f"checkpoint {path} cannot be exported: {exc}") from None
    else:
        logger.warning("%s has no %s: its files cannot be checked", path, layout.MANIFEST_FILE)
    return path


def parts_in_checkpoint(step_folder: Path) -> Tuple[ModelPart, ...]:
    """Which of vision_encoder / connector / language_model the checkpoint holds."""
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(str(Path(step_folder) / MODEL_OPTIM_DIR))
    return tuple(part for part in MODEL_PARTS if any(key.startswith(f"{part}.") for key in keys))


def read_conversion_info(step_folder: Path) -> Dict:
    path = Path(step_folder) / CONVERSION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_published_checkpoint(staging: Path, step_folder_name: str) -> None:
    """Manifest and ``latest`` for a save folder written by a converter."""
    layout.write_manifest(staging / step_folder_name)
    (staging / layout.LATEST_FILE).write_text(step_folder_name + "\n")


def state_of(model) -> Dict[str, torch.Tensor]:
    """Parameters and buffers by full name (``_extra_state`` entries dropped)."""
    return {
        name: tensor
        for name, tensor in model.state_dict().items()
        if isinstance(tensor, torch.Tensor)
    }


def extras_path(step_folder: Path) -> Optional[Path]:
    path = Path(step_folder) / EXTRAS_FILE
    return path if path.is_file() else None
