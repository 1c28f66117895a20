"""DPO at other layouts equals DPO in one process: the reference pass runs through
Megatron-Core's forward-only schedule (across pipeline stages too) and the loss pairs
documents inside each micro-batch, so TP=2 with SP, PP=2 (the vision stage) and data
parallelism must give the single-process losses and gradient norms (relative 1e-5, as
tests/parallel/test_layouts.py). Full weights (a frozen reference copy) and LoRA at TP=2
(the reference with the adapters off)."""

from __future__ import annotations

import json
import math

import pytest

from tests.parallel.test_lora_layouts import _run

NUM_STEPS = 3
RELATIVE_TOLERANCE = 1e-5
DPO = [
    "training.objective=preference",
    "data.mixture={preference: 1.0}",
    "optimizer.lr=0.001",
    "optimizer.warmup_steps=1",
    # Half the debug sequence and batch: several pairs per sequence still, half the time.
    "training.seq_length=128",
    "training.global_batch_size=4",
]
LORA = ["model.lora.rank=4", "model.lora.parts=[vision_encoder,connector,language_model]"]
DENSE_MASK = ["model.attention=dense_mask_reference"]

# name -> (reference, overrides)
LAYOUTS = {
    "tp2_sp": ("full", ["parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2_vision_stage": ("full", ["parallel.pipeline_parallel_size=2"]),
    "dp2": ("full", ["training.micro_batch_size=2"]),
    # (LoRA at PP=2 is tests/parallel/test_lora_layouts.py's; here the reference pass.)
    "lora_tp2": ("lora", LORA + ["parallel.tensor_parallel_size=2"]),
}
REFERENCES = {"full": DENSE_MASK, "lora": LORA + DENSE_MASK}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_layouts")
    _run(1, {name: DPO + overrides for name, overrides in REFERENCES.items()}, out, NUM_STEPS)
    layouts = {name: DPO + overrides for name, (_, overrides) in LAYOUTS.items()}
    _run(2, layouts, out, NUM_STEPS)
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dpo_layout_matches_single_process(results, layout):
    reference_name, _ = LAYOUTS[layout]
    reference = json.loads((results / f"{reference_name}.json").read_text())
    sharded = json.loads((results / f"{layout}.json").read_text())
    assert len(sharded) == len(reference) == NUM_STEPS
    for step, (ref, got) in enumerate(zip(reference, sharded), start=1):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RELATIVE_TOLERANCE), f"step {step}"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RELATIVE_TOLERANCE), (
            f"step {step}"
        )
    assert sharded[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy = reference
