"""Session fixtures of the conversion tests: tiny Hugging Face sources, their imports,
one torchrun run (2 processes) that loads the imports at TP=2 / EP=2 and trains the debug
model at TP=2 (dense) and EP=2 (MoE), the exports of those two trained models, and the
exports of one fine-tuning (SFT) model with tiles (``sft_run``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conversion.hf_sources import IMAGE_SIZE, VOCAB, build_source
from tests.rank_pool import session_pools

REPO = Path(__file__).resolve().parents[2]
LANGUAGE_SOURCES = ("llama", "qwen2", "mistral", "mixtral", "qwen3", "qwen3_moe")
VISION_SOURCES = ("clip_vision", "clip", "siglip_vision")
TOLERANCE = 1e-4

# The start of a `python -c` script that must run without our package: importing any
# mm1_megatron module raises (an export must load with transformers alone).
WITHOUT_OUR_PACKAGE = """
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mm1_megatron":
            raise ImportError("mm1_megatron is blocked in this process")
sys.meta_path.insert(0, Block())
"""

# name -> (source, part, parallel layout)
LAYOUT_LOADS = {
    "llama_tp2": ("llama", "language_model", {"tensor_parallel_size": 2}),
    "llama_pp2": ("llama", "language_model", {"pipeline_parallel_size": 2}),
    "qwen2_tp2": ("qwen2", "language_model", {"tensor_parallel_size": 2}),
    "mixtral_tp2_sp": (
        "mixtral",
        "language_model",
        {"tensor_parallel_size": 2, "sequence_parallel": True},
    ),
    "mixtral_ep2": ("mixtral", "language_model", {"expert_parallel_size": 2}),
    "qwen3_tp2_sp": (
        "qwen3",
        "language_model",
        {"tensor_parallel_size": 2, "sequence_parallel": True},
    ),
    "qwen3_moe_tp2": ("qwen3_moe", "language_model", {"tensor_parallel_size": 2}),
    "qwen3_moe_ep2": ("qwen3_moe", "language_model", {"expert_parallel_size": 2}),
    "clip_vision_tp2": ("clip_vision", "vision_encoder", {"tensor_parallel_size": 2}),
    "siglip_vision_tp2": ("siglip_vision", "vision_encoder", {"tensor_parallel_size": 2}),
}
TRAIN_BASE = [
    "training.train_steps=6",
    "optimizer.warmup_steps=2",
    "training.seq_length=64",
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "logging.progress_bar=false",
]
TRAINS = {
    "dense_tp2": TRAIN_BASE + ["parallel.tensor_parallel_size=2"],
    "moe_ep2": TRAIN_BASE
    + [
        "model.llm.moe.num_experts=4",
        "model.llm.moe.layer_frequency=2",
        "parallel.expert_parallel_size=2",
    ],
    # Qwen3-style decoders: q/k norms, 4 heads of 48 in a 128-wide model.
    "qwen3_trained_tp2": TRAIN_BASE
    + ["model.llm.qk_norm=true", "model.llm.head_dim=48", "parallel.tensor_parallel_size=2"],
}

# Loads and trains write OUT_DIR/<name>.safetensors side by side.
assert not set(LAYOUT_LOADS) & set(TRAINS), set(LAYOUT_LOADS) & set(TRAINS)


@pytest.fixture(scope="session")
def conversion_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conversion")


@pytest.fixture(scope="session")
def sources(conversion_dir):
    """name -> (eval-mode transformers model, its saved folder)."""
    built = {}
    for seed, name in enumerate(LANGUAGE_SOURCES + VISION_SOURCES):
        folder = conversion_dir / "hf" / name
        built[name] = (build_source(name, folder, seed=seed), folder)
    return built


@pytest.fixture(scope="session")
def imported(sources, conversion_dir, megatron_single_process):
    """name -> save folder written by ``import_checkpoint`` (in this process, TP=1)."""
    from mm1_megatron.conversion import ImportRequest, import_checkpoint

    folders = {}
    for name, (_, source) in sources.items():
        key = "language_model" if name in LANGUAGE_SOURCES else "vision_encoder"
        output = conversion_dir / "imported" / name
        import_checkpoint(ImportRequest(output=output, **{key: source}))
        folders[name] = output
    return folders


@pytest.fixture(scope="session")
def inputs(conversion_dir):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(123)
    tensors = {
        "tokens": torch.randint(0, VOCAB, (2, 16), generator=generator),
        "images": torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator),
    }
    path = conversion_dir / "inputs.safetensors"
    save_file(tensors, str(path))
    return tensors, path


@pytest.fixture(scope="session")
def worker_outputs(imported, inputs, conversion_dir) -> Path:
    """Runs ``conversion_worker.run_spec`` once on the session's pool of 2 ranks."""
    out = conversion_dir / "worker"
    out.mkdir()
    loads = [
        {
            "name": name,
            "checkpoint": str(imported[source]),
            "part": part,
            "parallel": parallel,
            "inputs": str(inputs[1]),
        }
        for name, (source, part, parallel) in LAYOUT_LOADS.items()
    ]
    trains = [{"name": name, "overrides": overrides} for name, overrides in TRAINS.items()]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"loads": loads, "trains": trains}))
    session_pools()(2).run("tests.conversion.conversion_worker:run_spec", str(spec), str(out))
    return out


def export_to(checkpoint, output, **kwargs) -> Path:
    """``export_checkpoint`` with ``ExportRequest`` fields as keywords."""
    from mm1_megatron.conversion import ExportRequest, export_checkpoint

    return export_checkpoint(ExportRequest(checkpoint=checkpoint, output=output, **kwargs))


@pytest.fixture(scope="session")
def trained_exports(worker_outputs, conversion_dir, megatron_single_process):
    """name -> MM1 export folder of each model trained in ``worker_outputs``."""
    return {
        name: export_to(worker_outputs / name / "ckpt", conversion_dir / "trained" / name)
        for name in TRAINS
    }


# Fine-tuning (SFT) exports: conversations with tiles, MM1's static 2x2 grid plus an
# overview after the tiles, and MM1.5's dynamic grid with the overview before them.
SFT_COMMON = (
    "data.mixture={conversation: 1.0}",
    "model.llm.max_sequence_length=512",
    "training.seq_length=512",
    "data.max_images_per_sequence=20",
    "data.tiling.tile_size=112",
)
SFT_EXPORTS = {
    # A separator between the tiles of a split image (any single token; "next" here).
    "static": SFT_COMMON
    + ("data.tiling.mode=static", "data.tiling.overview=after", "data.tiling.separator=next"),
    "dynamic": SFT_COMMON
    + (
        "data.tiling.mode=dynamic",
        "data.tiling.min_tiles=1",
        "data.tiling.max_tiles=4",
        "data.tiling.overview=before",
    ),
}


@pytest.fixture(scope="session")
def sft_run(conversion_dir, megatron_single_process):
    """One randomised model saved with each config of ``SFT_EXPORTS``, exported:
    ``(configs, export folders, the model)``."""
    from mm1_megatron.config import save_config
    from mm1_megatron.config.schema import MODEL_PARTS
    from mm1_megatron.conversion import megatron_io
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from tests.conftest import make_tiny_config
    from tests.conversion.hf_sources import randomize

    configs = {name: make_tiny_config(*overrides) for name, overrides in SFT_EXPORTS.items()}
    image_id = SyntheticTokenizer().image_token_id
    model = megatron_io.build_tp1_model(configs["static"].model, image_token_id=image_id, seed=11)
    randomize(model, seed=11)
    exports = {}
    for name, cfg in configs.items():
        step = conversion_dir / "sft" / name / "step_00000000"
        megatron_io.save_parts(model, step, MODEL_PARTS)
        save_config(cfg, step / "config.yaml")
        megatron_io.write_published_checkpoint(step.parent, step.name)
        exports[name] = export_to(step.parent, conversion_dir / "sft_hf" / name)
    return configs, exports, model
