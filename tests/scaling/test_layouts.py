"""Layout enumeration against brute force: every (TP, PP, DP, EP) with TP x PP x DP equal
to the GPU count, and every pipeline split, filtered by the config validation itself.

The one rule of our own: ``pipeline_splits`` leaves every stage at least one decoder layer
(the validation would accept empty middle stages, which only add pipeline latency)."""

from __future__ import annotations

import itertools

import pytest

from mm1_megatron.config import load_config, validate_config
from mm1_megatron.scaling.estimate.layouts import (
    Layout,
    apply_layout,
    layout_error,
    pipeline_splits,
    valid_layouts,
)
from mm1_megatron.scaling.estimate.stages import pipeline_stages, rank_parameters
from tests.conftest import CONFIG_DIR, DEBUG_CONFIG


def _validates(cfg) -> bool:
    try:
        validate_config(cfg)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("num_layers, pp", [(8, 1), (8, 2), (13, 3), (11, 5)])
def test_pipeline_splits_are_the_splits_validation_accepts(num_layers, pp):
    candidate = load_config(DEBUG_CONFIG, [f"model.llm.num_layers={num_layers}"])
    candidate.parallel.pipeline_parallel_size = pp
    brute = set()
    values = [None, *range(0, num_layers + 1)]
    for first, last in itertools.product(values, values):
        if pp > 1 and (first is None or last is None):
            continue  # the enumerator pins both ends (an even split is one of its pairs)
        candidate.parallel.num_decoder_layers_on_vision_stage = first
        candidate.parallel.num_decoder_layers_on_last_stage = last
        if not _validates(candidate):
            continue
        stages = pipeline_stages(candidate, num_microbatches=1)
        if all(stage.decoder_layers for stage in stages):
            brute.add((first, last))
    assert set(pipeline_splits(num_layers, pp)) == brute


def _brute_force_shapes(cfg, num_gpus: int) -> set:
    shapes = set()
    max_ep = num_gpus if cfg.model.llm.moe.num_experts else 1
    for tp, pp, cp in itertools.product(range(1, num_gpus + 1), repeat=3):
        if num_gpus % (tp * pp * cp) or cp not in (1, 2, 4, 8):
            continue
        dp = num_gpus // (tp * pp * cp)
        for ep in range(1, max_ep + 1):
            splits = list(pipeline_splits(cfg.model.llm.num_layers, pp))
            if any(
                layout_error(cfg, Layout(tp, pp, dp, ep, "none", *s, cp=cp), num_gpus) is None
                for s in splits[:1]
            ):
                shapes.add((tp, pp, dp, ep, cp))
    return shapes


@pytest.mark.parametrize(
    "config, num_gpus", [("mm1_30b.yaml", 64), ("mm1_3b_moe.yaml", 16), ("mm1_7b.yaml", 24)]
)
def test_enumerated_layouts_equal_brute_force(config, num_gpus):
    cfg = load_config(CONFIG_DIR / config)
    enumerated = {group[0].shape for group in valid_layouts(cfg, num_gpus, ["none"])}
    assert enumerated == _brute_force_shapes(cfg, num_gpus)
    assert enumerated  # the checker sees valid layouts, and rejects some:
    assert all(shape[0] != 8 for shape in enumerated) or config != "mm1_30b.yaml"


def test_enumerated_splits_pass_the_full_check():
    cfg = load_config(CONFIG_DIR / "mm1_30b.yaml")
    for group in valid_layouts(cfg, 64, ["selective"]):
        if group[0].pp == 4 and group[0].tp == 4:
            assert all(layout_error(cfg, layout, 64) is None for layout in group[::50])
            assert (12, 14) in {(g.vision_stage_layers, g.last_stage_layers) for g in group}
            return
    pytest.fail("TP4 PP4 is a valid layout of mm1_30b on 64 GPUs")


@pytest.mark.parametrize("config", ["mm1_30b.yaml", "mm1_3b_moe.yaml"])
def test_rank_parameters_add_up_to_the_model(config):
    """One rank per stage at TP=1, times EP for the experts: the whole model."""
    from mm1_megatron.models.param_count import count_parameters

    cfg = load_config(CONFIG_DIR / config)
    ep = cfg.parallel.expert_parallel_size
    layout = Layout(1, 4, 1, ep, "none", 6, 8) if config == "mm1_30b.yaml" else Layout(1, 1, ep, ep)
    cfg = apply_layout(cfg, layout)
    stages = pipeline_stages(cfg, num_microbatches=8)
    params = [rank_parameters(cfg.model, cfg.parallel, s) for s in stages]
    total = sum(p.total - p.experts + p.experts * ep for p in params)
    assert total == count_parameters(cfg.model).total
