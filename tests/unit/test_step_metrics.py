"""The step figures that watch data placement and loading: ``vision_imbalance`` (vision
FLOPs of the busiest data-parallel rank over the mean), ``data_wait_s`` and
``data_wait_fraction``, and that ``num_images`` (behind ``images_per_s``) counts what the
image encoder encodes: tiles with tiling, images at native resolution.

The vision FLOPs of a rank are checked against the per-image FLOP counts of
``training/flops.py`` (themselves checked against torch's FLOP counter in
``test_flops.py``), image by image; the reduction over ranks is a pure function of the
max and sum. The training runs check the figures end to end (``tests/e2e``,
``tests/parallel/test_layouts.py``).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.conftest import NATIVE_OVERRIDES

TILED = ("data.tiling.mode=static", "data.tiling.tile_size=112", "data.max_images_per_sequence=20")


def _batch(num_images, image_grids=None, seq_length=8):
    """A host micro-batch with what the step figures read."""
    num_images = torch.tensor(num_images, dtype=torch.long)
    batch = {
        "tokens": torch.zeros(len(num_images), seq_length, dtype=torch.long),
        "loss_mask": torch.ones(len(num_images), seq_length),
        "document_ids": torch.zeros(len(num_images), seq_length, dtype=torch.long),
        "num_real_tokens": torch.full((len(num_images),), seq_length, dtype=torch.long),
        "num_images": num_images,
    }
    if image_grids is not None:
        batch["image_grids"] = torch.tensor(image_grids, dtype=torch.long).reshape(-1, 2)
    return batch


def _per_input_training_flops(model, image_size=None):
    from mm1_megatron.training import flops

    forward = flops.vision_encoder_forward_flops(model, image_size)
    forward += flops.connector_forward_flops(model, image_size)
    return flops.FORWARD_AND_BACKWARD * forward


@pytest.mark.parametrize("tiled", [False, True], ids=["fixed_size", "tiles"])
def test_vision_flops_at_a_fixed_size_count_every_encoder_input(tiny_config, tiled):
    from mm1_megatron.data.pipeline.tiling import tile_size
    from mm1_megatron.training.flops import balance_weights
    from mm1_megatron.training.metrics import vision_cost_rows, vision_flops

    cfg = tiny_config(*TILED) if tiled else tiny_config()
    size = tile_size(cfg.data.tiling)
    assert size == (112 if tiled else None)
    batches = [_batch([2, 0]), _batch([1, 3])]  # two micro-batches of two sequences
    assert vision_cost_rows(batches).tolist() == [[2, 0, 0, 0], [4, 0, 0, 0]]
    got = vision_flops(batches, balance_weights(cfg.model, size))
    assert got == pytest.approx(6 * _per_input_training_flops(cfg.model, size), rel=1e-12)
    assert vision_flops([_batch([0, 0])], balance_weights(cfg.model, size)) == 0.0


def test_vision_flops_at_native_resolution_follow_each_images_patches(tiny_config):
    from mm1_megatron.training.flops import balance_weights
    from mm1_megatron.training.metrics import vision_cost_rows, vision_flops

    cfg = tiny_config(*NATIVE_OVERRIDES)
    # Sequence 0: a 2x3 and a 4x4 grid; sequence 1: text only; then a text-only batch,
    # which carries no image_grids at all.
    batches = [_batch([2, 0], [[2, 3], [4, 4]]), _batch([0])]
    assert vision_cost_rows(batches).tolist() == [[2, 6 + 16, 36 + 256, 0], [0, 0, 0, 0]]

    def one_image(num_patches):
        model = replace(cfg.model, vision=replace(cfg.model.vision, max_patches=num_patches))
        return _per_input_training_flops(model)

    got = vision_flops(batches, balance_weights(cfg.model))
    assert got == pytest.approx(one_image(6) + one_image(16), rel=1e-9)
    assert one_image(6) + one_image(16) < 2 * _per_input_training_flops(cfg.model)


def test_vision_imbalance_is_max_over_mean():
    from mm1_megatron.training.metrics import vision_imbalance

    assert vision_imbalance(30.0, 60.0, 3) == pytest.approx(1.5)  # loads 30, 20, 10
    assert vision_imbalance(7.0, 7.0, 1) == 1.0
    assert vision_imbalance(0.0, 0.0, 4) == 1.0  # no rank has images
    assert vision_imbalance(1e15 / 3, 1e15, 3) >= 1.0  # rounding never goes below 1


@pytest.mark.parametrize("native", [False, True], ids=["tiles", "native_resolution"])
def test_num_images_counts_what_the_encoder_encodes(tiny_config, native):
    """``images_per_s`` divides ``num_images``: tiles with tiling, one per image (of its
    own patch grid) at native resolution."""
    from mm1_megatron.data.build import build_run_data

    cfg = tiny_config(*(NATIVE_OVERRIDES if native else TILED))
    data, _ = build_run_data(cfg, seed=1)
    try:
        batches = [next(data) for _ in range(3)]
    finally:
        data.close()
    inputs = sum(int(b["num_images"].sum()) for b in batches)
    assert inputs > 0
    if native:
        assert inputs == sum(len(b["image_grids"]) for b in batches if "image_grids" in b)
    else:
        assert inputs == sum(b["images"].shape[0] for b in batches)
        assert all(b["images"].shape[-1] == 112 for b in batches if len(b["images"]))


def test_batch_figures_and_throughput_in_one_process(tiny_config, megatron_single_process):
    from mm1_megatron.training.metrics import StepAccounting

    cfg = tiny_config()
    accounting = StepAccounting(
        cfg, device=torch.device("cpu"), world_size=1, num_microbatches=2, peak_flops=None
    )
    accounting.start_step()
    figures = accounting.batch_figures(object(), [_batch([2, 0]), _batch([1, 3])], data_wait_s=0.25)
    assert figures["num_images"] == 6
    assert figures["vision_imbalance"] == 1.0  # one data-parallel rank
    assert figures["data_wait_s"] == 0.25
    speed = accounting.throughput(figures)
    assert 0.0 <= speed["data_wait_fraction"] <= 1.0
    assert speed["images_per_s"] == pytest.approx(6 / speed["step_time_s"])

    accounting.start_step()
    assert accounting.throughput({**figures, "data_wait_s": 1e6})["data_wait_fraction"] == 1.0


def test_the_console_line_shows_the_placement_and_loading_figures(tmp_path):
    from mm1_megatron.training.metrics import MetricsLogger

    line = MetricsLogger(
        tmp_path,
        enabled=False,
        total_steps=10,
        log_interval=1,
        tensorboard=False,
        progress_bar=False,
    )._console_line(
        5,
        {
            "loss": 2.5,
            "tokens_per_s": 1000.0,
            "images_per_s": 12.0,
            "vision_imbalance": 1.0312,
            "data_wait_s": 0.0123,
            "data_wait_fraction": 0.01,
            "mfu": float("nan"),
        },
    )
    assert "tokens_per_s 1000 | images_per_s 12 | vision max/mean 1.03 | data wait 0.01s" in line
    assert "mfu" not in line and line.startswith("step 5 | loss 2.5 |")
