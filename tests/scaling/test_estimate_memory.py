"""``mm1-estimate``'s memory against what a real training step allocates, on CPU.

The trainer runs one step (Adam's state appears on the first) and then a measured one:
its weights, gradient buffers and optimizer state are read off the model and optimizer,
and the step's peak is the most tensor storage alive at once (``LiveTensorBytes``). The
estimate for the same config on ``device="cpu"`` (fp32, the composite RMSNorm, unfused
SwiGLU and QuickGELU) must agree within the tolerances below; caption-only data fills every
sequence to (nearly) the image cap the estimate assumes. ``tools/check_estimate_memory.py``
runs the same comparison on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.scaling.estimate.measure import LiveTensorBytes, measure_train_step
from mm1_megatron.scaling.estimate.memory import estimate_memory
from mm1_megatron.scaling.estimate.workload import default_workload
from tests.conftest import NATIVE_OVERRIDES

STATIC_TOLERANCE = 0.001  # Megatron-Core pads its gradient buffer to whole buckets
PEAK_TOLERANCE = 0.03  # measured: +0.7% (none), +2.0% (full); docs/scaling.md
CAPTIONS_ONLY = ("data.mixture.caption=1.0", "data.mixture.interleaved=0", "data.mixture.text=0")


def test_live_tensor_bytes_sees_frees_and_views():
    with LiveTensorBytes() as tracker:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 B
        view = a[10:20]  # no new storage
        b = torch.empty(500, dtype=torch.float64)  # 4000 B: 8000 live
        del a, view
        c = torch.zeros(250, dtype=torch.float32)  # 1000 B: 5000 live
        del b, c
    assert tracker.peak == 8000
    assert tracker.live == 0


# Qwen3's attention: q/k norms and 4 heads of 48 in the 128-wide debug decoder.
QWEN3 = ("model.llm.qk_norm=true", "model.llm.head_dim=48")
# SigLIP 2's NaFlex tower: every image is estimated at its whole patch budget (the
# synthetic images reach 15 or 16 of 16 patches), the ViT attends per image.
SETTINGS = {
    "none": ("none", ()),
    "full": ("full", ()),
    "qwen3_heads": ("none", QWEN3),
    "native_resolution": ("none", NATIVE_OVERRIDES),
}


@pytest.fixture(params=sorted(SETTINGS))
def measured(request, tmp_path, megatron_single_process):
    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.training.trainer import Trainer
    from tests.conftest import DEBUG_CONFIG

    cfg = validate_config(
        load_config(
            DEBUG_CONFIG,
            [
                f"logging.output_dir={tmp_path}",
                f"parallel.recompute={SETTINGS[request.param][0]}",
                *CAPTIONS_ONLY,
                *SETTINGS[request.param][1],
            ],
        )
    )
    return cfg, measure_train_step(Trainer(cfg))


def test_estimated_memory_matches_a_measured_training_step(measured):
    cfg, got = measured
    stage = estimate_memory(cfg, default_workload(cfg), num_gpus=1, device="cpu").stages[0]
    assert stage.weights == pytest.approx(got.weights, rel=STATIC_TOLERANCE)
    assert stage.gradients == pytest.approx(got.gradients, rel=STATIC_TOLERANCE)
    assert stage.optimizer_states == pytest.approx(got.optimizer_states, rel=STATIC_TOLERANCE)
    assert stage.activations_peak == pytest.approx(got.activations_peak, rel=PEAK_TOLERANCE)
    assert stage.total == pytest.approx(got.step_peak, rel=PEAK_TOLERANCE)
