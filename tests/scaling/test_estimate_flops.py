"""``mm1-estimate``'s FLOPs, component by component, against torch's ``FlopCounterMode``
on one forward of the tiny model; its per-step total is the count MFU uses.

``tests/unit/test_flops.py`` checks the totals of ``training/flops.py``; here each part the
estimator splits a step into (the ViT, the connector, each decoder layer, the output layer,
what a pipeline stage runs) is checked against what torch counts inside that module. As
there, the decoder is counted with the dense-mask reference attention, whose score matmuls
the counter sees (all ``s x s`` pairs).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mm1_megatron.scaling.estimate.compute import flops_per_sequence, stage_forward_flops
from mm1_megatron.scaling.estimate.stages import Stage
from mm1_megatron.scaling.estimate.workload import default_workload
from mm1_megatron.training import flops
from tests.conftest import NATIVE_OVERRIDES


@pytest.fixture(scope="module")
def counted(megatron_single_process):
    """Per-module FLOPs of one forward of the tiny model, and what it ran on."""
    from mm1_megatron.batch import model_inputs, run_model
    from mm1_megatron.data.build import build_run_data
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import seed_everything
    from tests.conftest import IMAGE_TOKEN_ID, make_tiny_config

    cfg = make_tiny_config("model.attention=dense_mask_reference", "model.llm.num_layers=3")
    seed_everything(1)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID)
    data, _ = build_run_data(cfg, seed=1)
    batch = model_inputs(next(data), torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        run_model(model, batch)
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return cfg, batch, by_module


def _module(by_module, name: str) -> int:
    return by_module[f"MM1Model.{name}"]


def test_vision_encoder_flops_equal_torchs_count(counted):
    cfg, batch, by_module = counted
    num_images, size = batch["images"].shape[0], batch["images"].shape[-1]
    formula = num_images * flops.vision_encoder_forward_flops(cfg.model, size)
    assert formula == _module(by_module, "vision_encoder")


def test_each_decoder_layer_and_the_output_layer_equal_torchs_count(counted):
    """Exact once the two conventions are named: the formula counts the layer's two
    RMSNorm weights (and the final norm's) as matmul weights, 2 FLOPs per token each; the
    reference attention computes all ``s x s`` pairs, the formula takes the pair count."""
    cfg, batch, by_module = counted
    num_sequences, seq = batch["tokens"].shape
    h = cfg.model.llm.hidden_size
    for i in range(cfg.model.llm.num_layers):
        formula = num_sequences * flops.decoder_layer_forward_flops(
            cfg.model, seq, i, attention_pairs=seq * seq
        )
        norms = num_sequences * seq * 2 * (2 * h)
        assert formula - norms == _module(by_module, f"language_model.decoder.layers.{i}")
    output = num_sequences * flops.output_layer_forward_flops(cfg.model, seq)
    final_norm = num_sequences * seq * 2 * h
    assert output - final_norm == _module(by_module, "language_model.output_layer")


def test_connector_flops_bound_torchs_count(counted):
    """The formula counts the C-Abstractor's squeeze-excite and norm weights at every grid
    position (they run once per image, or are no matmuls): an over-count of about 6% here
    and about 5% at MM1's widths (squeeze-excite is a fixed share of a block's weights);
    the connector is under 1% of an MM1 step's FLOPs."""
    cfg, batch, by_module = counted
    num_images, size = batch["images"].shape[0], batch["images"].shape[-1]
    formula = num_images * flops.connector_forward_flops(cfg.model, size)
    measured = _module(by_module, "connector")
    assert measured <= formula <= 1.10 * measured


def test_a_single_stage_runs_what_the_model_counts(counted):
    """``stage_forward_flops`` of a stage that holds everything is the model's forward."""
    cfg, batch, by_module = counted
    num_sequences, seq = batch["tokens"].shape
    num_images, size = batch["images"].shape[0], batch["images"].shape[-1]
    workload = dataclasses.replace(
        default_workload(cfg),
        images_per_sequence=num_images / num_sequences,  # a mean: the micro-batch's images
        image_size=size,
        attention_pairs_per_sequence=seq * seq,
    )
    layers = tuple(range(cfg.model.llm.num_layers))
    stage = Stage(0, layers, has_vision=True, has_output=True, in_flight=1)
    f = stage_forward_flops(cfg.model, workload, stage, micro=num_sequences)
    h = cfg.model.llm.hidden_size
    norms_as_matmuls = num_sequences * seq * 2 * h * (2 * len(layers) + 1)
    counted_total = _module(by_module, "vision_encoder") + sum(
        _module(by_module, f"language_model.decoder.layers.{i}") for i in layers
    )
    counted_total += _module(by_module, "language_model.output_layer")
    assert f.split - norms_as_matmuls == counted_total
    assert f.replicated == num_images * flops.connector_forward_flops(cfg.model, size)


def test_per_step_flops_are_the_mfu_count(counted):
    """The estimator's step FLOPs are ``training_flops_per_step``, the trainer's MFU count,
    for the same sequences, images and document pairs."""
    cfg, batch, _ = counted
    num_sequences, seq = batch["tokens"].shape
    num_images, size = batch["images"].shape[0], batch["images"].shape[-1]
    pairs = flops.causal_attention_pairs(batch["document_ids"])
    workload = dataclasses.replace(
        default_workload(cfg),
        images_per_sequence=num_images / num_sequences,
        image_size=size,
        attention_pairs_per_sequence=pairs / num_sequences,
    )
    per_sequence = flops_per_sequence(cfg.model, workload)
    mfu_count = flops.training_flops_per_step(
        cfg.model,
        num_sequences=num_sequences,
        seq_length=seq,
        num_images=num_images,
        attention_pairs=pairs,
        image_size=size,
    )
    assert num_sequences * per_sequence.total == pytest.approx(mfu_count, rel=1e-12)


def test_layers_and_output_add_up_to_the_language_model(tiny_config):
    cfg = tiny_config("model.llm.moe.num_experts=4", "model.llm.moe.layer_frequency=2")
    seq, pairs = 64, 1000
    parts = sum(
        flops.decoder_layer_forward_flops(cfg.model, seq, i, attention_pairs=pairs)
        for i in range(cfg.model.llm.num_layers)
    ) + flops.output_layer_forward_flops(cfg.model, seq)
    whole = flops.language_model_forward_flops(cfg.model, seq, attention_pairs=pairs)
    assert parts == pytest.approx(whole, rel=1e-12)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """torch counts no FLOPs for SDPA's CPU kernel, which per-image attention runs."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _counted(function, *args) -> int:
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    with FlopCounterMode(display=False, custom_mapping={sdpa: _cpu_sdpa_flops}) as counter:
        with torch.no_grad():
            function(*args)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def counted_native(megatron_single_process):
    """The ViT's FLOPs on a native-resolution batch (packed images of several grids), and
    those of resizing its position table to each distinct grid (which the formula leaves
    out: once per grid, not per image)."""
    from mm1_megatron.data.build import build_run_data
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.models.naflex import resize_position_grid
    from mm1_megatron.parallel import seed_everything
    from tests.conftest import IMAGE_TOKEN_ID, make_tiny_config

    cfg = make_tiny_config(*NATIVE_OVERRIDES)
    seed_everything(1)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=IMAGE_TOKEN_ID)
    data, _ = build_run_data(cfg, seed=1)
    batch = next(b for b in data if b["image_grids"].shape[0] >= 2)
    grids = [tuple(grid) for grid in batch["image_grids"].tolist()]
    encoder = model.vision_encoder
    measured = _counted(encoder.encode_packed, batch["images"], grids)
    table, side = encoder.position_embedding, encoder.grid_size
    resizes = sum(_counted(resize_position_grid, table, side, grid) for grid in set(grids))
    return cfg, grids, measured - resizes


def test_native_vit_flops_count_each_image_at_its_patch_budget(counted_native):
    """Exact for an image of ``max_patches`` patches, so each image's count is the formula
    at its own grid; the estimate and MFU take the budget, which bounds them all."""
    cfg, grids, measured = counted_native

    def at(patches: int) -> float:
        vision = dataclasses.replace(cfg.model.vision, max_patches=patches)
        return flops.vision_encoder_forward_flops(dataclasses.replace(cfg.model, vision=vision))

    assert measured == sum(at(rows * cols) for rows, cols in grids)
    per_image = flops.vision_encoder_forward_flops(cfg.model)
    assert per_image == at(cfg.model.vision.max_patches)
    assert measured <= len(grids) * per_image
    assert flops.patches_per_image(cfg.model, 999) == cfg.model.vision.max_patches
