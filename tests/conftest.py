"""Shared fixtures: one single-process Megatron world per session, seeding, tiny configs.

Megatron-Core modules read its parallel state when they are built, so every test that
builds a model asks for ``megatron_single_process`` (directly or through ``seeded`` /
``build_tiny_model``). The world is a single gloo process on a free port; on a machine
without CUDA ``init_distributed`` also installs the CPU stand-ins of ``mm1_megatron.compat``.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from tests.in_process import train_in_process

# Counts the processes every test starts and fails an unmarked test that starts one.
pytest_plugins = ["tests.process_launches"]

# Folders whose every test trains a model, starts commands or compares layouts: the slow
# tier as a whole (pytest.ini). Elsewhere a module or test carries the marker itself.
SLOW_FOLDERS = ("checkpoint", "conversion", "e2e", "parallel", "te")


def pytest_sessionfinish(session, exitstatus):
    from tests.rank_pool import stop_session_pools

    stop_session_pools()


def pytest_collection_modifyitems(config, items):
    tests_root = Path(__file__).resolve().parent
    for item in items:
        relative = Path(item.fspath).resolve().relative_to(tests_root)
        if relative.parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEBUG_CONFIG = CONFIG_DIR / "debug.yaml"
IMAGE_TOKEN_ID = 3

# Shrinks configs/debug.yaml further so that building and running a model takes
# milliseconds: 56 px images -> a 4x4 patch grid, 1 ViT layer, a 2-layer GQA decoder.
TINY_OVERRIDES = (
    "model.vision.hidden_size=32",
    "model.vision.num_layers=1",
    "model.vision.num_attention_heads=2",
    "model.vision.ffn_hidden_size=64",
    "model.connector.hidden_size=32",
    "model.llm.hidden_size=32",
    "model.llm.num_layers=2",
    "model.llm.num_attention_heads=4",
    "model.llm.num_query_groups=2",
    "model.llm.ffn_hidden_size=64",
    "model.llm.max_sequence_length=64",
    "training.seq_length=64",
)

# SigLIP 2's NaFlex tower on the tiny model (configs/debug_siglip2_naflex.yaml's vision):
# SigLIP's stem at native resolution, each image within 16 patches.
NATIVE_OVERRIDES = (
    "model.vision.use_class_token=false",
    "model.vision.patch_embedding_bias=true",
    "model.vision.pre_layernorm=false",
    "model.vision.post_layernorm=true",
    "model.vision.activation=gelu_tanh",
    "model.vision.native_resolution=true",
    "model.vision.max_patches=16",
)


def make_tiny_config(*overrides: str):
    """``configs/debug.yaml`` shrunk by ``TINY_OVERRIDES``, then ``overrides``; validated."""
    from mm1_megatron.config import load_config, validate_config

    return validate_config(load_config(DEBUG_CONFIG, list(TINY_OVERRIDES) + list(overrides)))


@pytest.fixture(scope="session")
def megatron_single_process():
    """torch.distributed (gloo, world size 1) plus Megatron's model-parallel groups."""
    from mm1_megatron.config import ParallelConfig
    from mm1_megatron.parallel import init_distributed, shutdown_distributed

    ctx = init_distributed(ParallelConfig())
    yield ctx
    shutdown_distributed()


@pytest.fixture
def seeded(megatron_single_process):
    """Seeds Python, NumPy, torch and Megatron's RNG tracker (1234 now; call to reseed)."""
    from mm1_megatron.parallel import seed_everything

    def _seed(seed: int = 1234) -> None:
        seed_everything(seed)

    _seed()
    return _seed


@pytest.fixture
def tiny_config():
    """Factory: ``tiny_config("model.llm.tie_embeddings=true", ...)`` -> ``MM1Config``."""
    return make_tiny_config


@pytest.fixture
def build_tiny_model(seeded):
    """Factory: seed, then ``build_mm1_model(cfg.model, cfg.parallel, image_token_id=3)``."""
    from mm1_megatron.models import build_mm1_model

    def _build(cfg, seed: int = 1234):
        seeded(seed)
        return build_mm1_model(cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID)

    return _build


@pytest.fixture(autouse=True, scope="module")
def free_dali_pipelines():
    """After each module, collect what its tests left in reference cycles. A DALI
    pipeline left there keeps its threads, and a later test that forks data-loader
    workers (``tests/data/test_loader.py``) then fails now and then with the worker
    killed by a segmentation fault (seen twice on Python 3.11 in CI): a fork copies no
    threads, only the locks they held. The library builds its pipelines in the process
    that uses them (``images.py``), so only a process running many tests meets this."""
    yield
    if "nvidia.dali" in sys.modules:
        gc.collect()


# ---- one uninterrupted debug run that checkpoint and cluster tests compare with ----------
REFERENCE_STEPS = 6


@pytest.fixture(scope="session")
def reference(megatron_single_process, tmp_path_factory):
    """An uninterrupted single-process debug run of ``REFERENCE_STEPS`` steps that saves
    every 2 steps (``run/metrics.jsonl``, ``ckpt/``). Saving does not change the losses,
    so runs that save differently (asynchronously, on SIGTERM) must reproduce them, and
    every parallel layout reproduces a single-process run to 1e-5
    (``tests/parallel/test_layouts.py``, on 128-token sequences).
    It runs in this process: its losses equal a child's bit for bit (the debug run is
    seeded), and the tests that compare with it start their own commands."""
    out = tmp_path_factory.mktemp("reference")
    result = train_in_process(
        "logging.tensorboard=false",
        f"training.train_steps={REFERENCE_STEPS}",
        f"logging.output_dir={out / 'run'}",
        f"checkpoint.save_dir={out / 'ckpt'}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=5",
    )
    assert result.returncode == 0, result.log[-3000:]
    return out
