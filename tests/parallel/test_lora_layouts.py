"""LoRA at every layout equals LoRA in one process: per-step loss and gradient norm, and the
adapters each layout trained and saved, read back at TP=1 (which also proves that a LoRA
checkpoint reshards: TP=2 -> 1 with the gated linear_fc1's [gate; up] rows, PP=2 -> 1,
EP=2 -> 1).

Adapters go on every part (ViT, connector, decoder) and every target linear; the MoE runs
adapt the experts too (explicit expert communication, and at EP=2 x TP=2 the expert-TP
gradient sums). Each run starts from a base checkpoint (a short single-process run) and
trains 3 steps: at step 1 only ``B`` moves (it starts at zero), so steps 2 and 3 check the
whole adapter path, including ``A``'s gradient.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import IMAGE_TOKEN_ID
from tests.in_process import call_in_process
from tests.rank_pool import session_pools

NUM_STEPS = 3
RELATIVE_TOLERANCE = 1e-5
WORKER = "tests.parallel.layout_worker:run_layouts"

LORA = [
    "model.lora.rank=4",
    "model.lora.alpha=8",
    "model.lora.parts=[vision_encoder,connector,language_model]",
]
MOE = [
    "model.llm.moe.num_experts=4",
    "model.llm.moe.layer_frequency=2",
    "model.llm.moe.aux_loss_coeff=0",
    "model.llm.moe.z_loss_coeff=0",
]
DENSE_MASK = ["model.attention=dense_mask_reference"]
TP2 = ["parallel.tensor_parallel_size=2"]
SP = ["parallel.sequence_parallel=true"]

# name -> (world size, reference, overrides)
LAYOUTS = {
    "tp2": (2, "dense", TP2),
    "tp2_sp": (2, "dense", TP2 + SP),
    "pp2_vision_stage": (2, "dense", ["parallel.pipeline_parallel_size=2"]),
    "ep2": (2, "moe", MOE + ["parallel.expert_parallel_size=2"]),
    "ep2_tp2_sp": (4, "moe", MOE + TP2 + SP + ["parallel.expert_parallel_size=2"]),
}
REFERENCES = {"dense": DENSE_MASK, "moe": MOE + DENSE_MASK}


def _run(world_size: int, layouts: dict, out_dir: Path, steps: int) -> None:
    spec = out_dir / f"spec_{world_size}_{'_'.join(sorted(layouts))}.json"
    spec.write_text(json.dumps({"steps": steps, "layouts": layouts}))
    if world_size == 1:
        from tests.parallel import layout_worker

        call_in_process(layout_worker.run_layouts, str(spec), str(out_dir))
    else:
        session_pools()(world_size).run(WORKER, str(spec), str(out_dir))


# Half the debug sequence and batch (2 micro-batches of 2): the same code paths, half
# the time.
SMALLER = ["training.seq_length=128", "training.global_batch_size=4", "training.micro_batch_size=2"]


def _saving(out_dir: Path, name: str, base: Path) -> list:
    return SMALLER + [
        f"checkpoint.save_dir={out_dir / name / 'ckpt'}",
        f"checkpoint.initial_weights={base}",
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora_layouts")
    bases = {"dense": [], "moe": MOE}
    base_runs = {
        f"base_{kind}": overrides
        + SMALLER
        + [f"checkpoint.save_dir={out / f'base_{kind}' / 'ckpt'}"]
        for kind, overrides in bases.items()
    }
    _run(1, base_runs, out, steps=1)
    base_of = {kind: out / f"base_{kind}" / "ckpt" for kind in bases}
    references = {
        name: LORA + overrides + _saving(out, name, base_of[name])
        for name, overrides in REFERENCES.items()
    }
    _run(1, references, out, NUM_STEPS)
    for world_size in (2, 4):
        layouts = {
            name: LORA + overrides + _saving(out, name, base_of[reference])
            for name, (size, reference, overrides) in LAYOUTS.items()
            if size == world_size
        }
        _run(world_size, layouts, out, NUM_STEPS)
    return out


def _history(out_dir: Path, name: str) -> list:
    return json.loads((out_dir / f"{name}.json").read_text())


def _trained_adapters(out_dir: Path, name: str, overrides: list) -> dict:
    """The adapters of ``name``'s last checkpoint, read into a TP=1 model here."""
    from mm1_megatron.checkpoint.adapters import load_trained_weights
    from mm1_megatron.config import load_config
    from mm1_megatron.config.schema import ParallelConfig
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.models.lora import is_adapter_key
    from tests.conftest import DEBUG_CONFIG

    cfg = load_config(DEBUG_CONFIG, LORA + overrides)
    model = build_mm1_model(cfg.model, ParallelConfig(), image_token_id=IMAGE_TOKEN_ID)
    load_trained_weights(model, out_dir / name / "ckpt" / f"step_{NUM_STEPS:08d}")
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_adapter_key(k)}


CASES = sorted(LAYOUTS)


@pytest.mark.parametrize("layout", CASES)
def test_lora_layout_matches_single_process(results, megatron_single_process, layout):
    _, reference_name, overrides = LAYOUTS[layout]
    reference, sharded = _history(results, reference_name), _history(results, layout)
    assert len(sharded) == len(reference) == NUM_STEPS
    for step, (ref, got) in enumerate(zip(reference, sharded), start=1):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RELATIVE_TOLERANCE), f"step {step}"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RELATIVE_TOLERANCE), (
            f"step {step}"
        )
    moe = MOE if reference_name == "moe" else []
    expected = _trained_adapters(results, reference_name, moe)
    trained = _trained_adapters(results, layout, moe)
    assert sorted(trained) == sorted(expected)
    assert any(k.endswith("experts.local_experts.3.linear_fc1.lora_b") for k in trained) == bool(
        moe
    )
    for key, value in expected.items():
        assert value.abs().max() > 0, f"{key} did not train"
        torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-6, msg=key)
