"""Generation on a native-resolution model at TP=2 and PP=2 gives the single-process
tokens: packed patches and their grids reach the first pipeline stage, which encodes
them, and every tensor-parallel rank's encoder. CPU, gloo, fp32; the model is built with
``init_seed`` (the same weights at every layout); the prompts are
``tests/unit/test_native_generation.py``'s (0-3 images of several aspect ratios)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import NATIVE_OVERRIDES
from tests.in_process import call_in_process
from tests.rank_pool import session_pools

PP2 = ["parallel.pipeline_parallel_size=2"]
LAYOUTS = {
    "tp2": ["parallel.tensor_parallel_size=2"],
    "pp2": PP2,
    "pp2_one_layer_on_vision_stage": PP2 + ["parallel.num_decoder_layers_on_vision_stage=1"],
}
NUM_PROMPTS = 6


def run_native_layouts(spec_path: str, out_dir: str) -> None:
    """Each layout of the spec (``{name: overrides}``); rank 0 writes ``<name>.json``."""
    for name, overrides in json.loads(Path(spec_path).read_text()).items():
        _run_layout(name, overrides, Path(out_dir))


def _run_layout(name: str, overrides, out: Path) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import init_distributed, seed_everything
    from tests.conftest import make_tiny_config
    from tests.parallel.generation_worker import (
        BASE_OVERRIDES,
        COLLECTIVE_TIMEOUT_MINUTES,
        SEED,
        _generate_group,
    )
    from tests.parallel.layout_worker import _forget_model_parallel_groups
    from tests.unit.test_native_generation import _native_prompts

    tokenizer = SyntheticTokenizer()
    cfg = make_tiny_config(*BASE_OVERRIDES, *NATIVE_OVERRIDES, *overrides)
    init_distributed(cfg.parallel, timeout_minutes=COLLECTIVE_TIMEOUT_MINUTES)
    seed_everything(SEED)
    model = build_mm1_model(
        cfg.model,
        cfg.parallel,
        image_token_id=tokenizer.image_token_id,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        init_seed=SEED,
    ).eval()
    results = _generate_group(model, _native_prompts(cfg, NUM_PROMPTS), 0, tokenizer, None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(results))
    del model
    _forget_model_parallel_groups()


def _launch(world_size: int, layouts: dict, out_dir: Path) -> None:
    spec = out_dir / f"spec_{world_size}.json"
    spec.write_text(json.dumps(layouts))
    if world_size == 1:
        call_in_process(run_native_layouts, str(spec), str(out_dir))
        return
    target = f"{__name__}:run_native_layouts"
    session_pools()(world_size).run(target, str(spec), str(out_dir), timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("native_generation_layouts")
    _launch(1, {"reference": []}, out_dir)
    _launch(2, LAYOUTS, out_dir)
    return out_dir


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_generates_the_single_process_tokens(results, layout):
    reference = json.loads((results / "reference.json").read_text())
    sharded = json.loads((results / f"{layout}.json").read_text())
    assert any(reference["greedy_free"]) and any(reference["beam3_free"])
    assert sharded == reference  # greedy and 3-beam outputs
