"""Every parallel layout reproduces a single-process run of the same seed and data.

CPU, gloo, fp32. Each layout trains ``NUM_STEPS`` steps of the debug model (images from
the default 45/45/10 mixture) and, separately, on text-only data (no image in any
micro-batch). Loss and gradient norm of every step must match the single-process run
to a relative 1e-5: the layouts change only how sums are split and reduced, which moves
fp32 results by about 1e-7 relative per step (measured), and 1e-5 still catches any
wrong weight, missing gradient reduction or misrouted token, which move them by 1e-3 or
more.

The MoE cases switch off the router's auxiliary losses, which are not invariant to the
layout by design: the load-balancing loss is a non-linear function of which sequences
share a micro-batch (data parallelism groups them differently from a single process),
and Megatron-Core normalises the z-loss per micro-batch and per TP x CP group rather
than per token (measured: 1e-4 relative on the gradient norm at EP=2 x TP=2 with SP).
``tests/e2e/test_moe_training.py`` checks that both losses are computed and logged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import NATIVE_OVERRIDES
from tests.in_process import call_in_process
from tests.launch import launcher, run
from tests.rank_pool import session_pools

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("layout_worker.py")
NUM_STEPS = 3
RELATIVE_TOLERANCE = 1e-5
# Every run of the matrix (references and layouts) packs 128-token sequences, half the
# debug config's: still several documents and images per sequence, half the compute. How
# a layout splits and reduces the sums does not depend on the length.
SHORT_SEQUENCES = ["training.seq_length=128"]

# Every decoder layer of experts, the last one too: what is drawn after the last layer
# (the output layer) then follows a rank's own experts unless the experts leave the
# generator keyed to the layer (models/seeding.py), which EP layouts check. The goldens
# (tests/golden/runs.py) keep a dense layer between expert layers.
MOE = [
    "model.llm.moe.num_experts=4",
    "model.llm.moe.layer_frequency=1",
    "model.llm.moe.aux_loss_coeff=0",
    "model.llm.moe.z_loss_coeff=0",
]
# Qwen3's attention: q/k RMSNorms (whose gradients are summed over the TP group) and a
# head width of its own (4 heads of 48 in a 128-wide model).
QWEN3 = ["model.llm.qk_norm=true", "model.llm.head_dim=48"]
# SigLIP 2's NaFlex tower: images of five aspect ratios as packed patches with their grids,
# per-image attention in the ViT (configs/debug_siglip2_naflex.yaml's vision settings).
NATIVE = list(NATIVE_OVERRIDES)
TEXT_ONLY = ["data.mixture={text: 1.0}"]
TP2 = ["parallel.tensor_parallel_size=2"]
SP = ["parallel.sequence_parallel=true"]
PP2 = ["parallel.pipeline_parallel_size=2"]
OVERLAP = ["parallel.overlap_grad_reduce=true", "parallel.overlap_param_gather=true"]
CP2 = ["parallel.context_parallel_size=2"]

# The single-process references attend through the explicit [b, 1, s, s] mask; every
# layout through per-document attention: each comparison also checks the attention path.
DENSE_MASK = ["model.attention=dense_mask_reference"]
REFERENCES = {
    "dense": DENSE_MASK,
    "moe": MOE + DENSE_MASK,
    "qwen3": QWEN3 + DENSE_MASK,
    "native": NATIVE + DENSE_MASK,
}

# name -> (world size, reference, overrides)
LAYOUTS = {
    "tp2": (2, "dense", TP2),
    "tp2_sp": (2, "dense", TP2 + SP),
    "qwen3_tp2_sp": (2, "qwen3", QWEN3 + TP2 + SP),
    "pp2_vision_stage": (2, "dense", PP2),
    "pp2_one_layer_on_vision_stage": (
        2,
        "dense",
        PP2 + ["parallel.num_decoder_layers_on_vision_stage=1"],
    ),
    "pp2_pinned_first_and_last_stage": (
        2,
        "dense",
        PP2
        + [
            "parallel.num_decoder_layers_on_vision_stage=1",
            "parallel.num_decoder_layers_on_last_stage=3",
        ],
    ),
    "ep2": (2, "moe", MOE + ["parallel.expert_parallel_size=2"]),
    "dp2_distopt_accumulation": (2, "dense", ["training.micro_batch_size=2"]),
    "dp2_overlapped_grad_reduce_and_param_gather": (
        2,
        "dense",
        ["training.micro_batch_size=1"] + OVERLAP,
    ),
    "tp2_recompute_full": (2, "dense", TP2 + ["parallel.recompute=full"]),
    "dp2_recompute_selective": (2, "dense", ["parallel.recompute=selective"]),
    "ep2_tp2_sp": (4, "moe", MOE + TP2 + SP + ["parallel.expert_parallel_size=2"]),
    "tp2_pp2": (4, "dense", TP2 + PP2),
    # The packed patches and their host grids reach every TP rank, only the vision stage
    # of a pipeline, and each DP rank its own images.
    "native_tp2_sp": (2, "native", NATIVE + TP2 + SP),
    "native_pp2_vision_stage": (2, "native", NATIVE + PP2),
    "native_dp2": (2, "native", NATIVE + ["training.micro_batch_size=2"]),
    # Context parallelism: each rank's share of every packed row (whole-row chunks r and
    # 3 - r of 4) and only the images with a token in it, the vision stage of a pipeline
    # passing on only its share, experts routing each rank's tokens.
    "cp2": (2, "dense", CP2 + ["training.micro_batch_size=2"]),
    "cp2_tp2_sp": (4, "dense", CP2 + TP2 + SP),
    "cp2_pp2_vision_stage": (4, "dense", CP2 + PP2),
    "cp2_ep2": (2, "moe", MOE + CP2 + ["parallel.expert_parallel_size=2"]),
    # Each rank encodes only the images with a token in its share: packed patches picked
    # by their host grids.
    "native_cp2": (2, "native", NATIVE + CP2),
}


def _run_worker(
    world_size: int,
    layouts: dict,
    out_dir: Path,
    *,
    steps: int = NUM_STEPS,
    fresh_processes: bool = False,
) -> None:
    """``layout_worker.run_layouts`` on ``world_size`` ranks: the session's rank pool
    (``tests/rank_pool.py``), this process for a world of one (the references: the same
    seeded runs), or a new torchrun where the point is a new process (a resume)."""
    spec = out_dir / f"spec_{world_size}_{'_'.join(sorted(layouts))[:80]}.json"
    spec.write_text(json.dumps({"steps": steps, "layouts": layouts}))
    if fresh_processes:
        result = run([*launcher(world_size), str(WORKER), str(spec), str(out_dir)], timeout=900)
        assert result.returncode == 0, result.stderr[-6000:]
    elif world_size == 1:
        from tests.parallel import layout_worker

        call_in_process(layout_worker.run_layouts, str(spec), str(out_dir))
    else:
        target = "tests.parallel.layout_worker:run_layouts"
        session_pools()(world_size).run(target, str(spec), str(out_dir))


# Text-only batches (no image in any micro-batch) where they take another path: the
# vision stage of a pipeline, sequence-parallel scatter, expert routing, overlapped
# gradient buckets whose vision parameters get no gradient. The other layouts differ from
# these only in ways an image-free batch does not touch.
TEXT_ONLY_LAYOUTS = (
    "tp2_sp",
    "pp2_vision_stage",
    "pp2_one_layer_on_vision_stage",
    "ep2",
    "dp2_overlapped_grad_reduce_and_param_gather",
    "tp2_pp2",
)


def _with_text_variants(layouts: dict, text_only=None) -> dict:
    """Each layout, with ``SHORT_SEQUENCES``, and its text-only variant where asked."""
    expanded = {}
    for name, overrides in layouts.items():
        expanded[name] = SHORT_SEQUENCES + overrides
        if text_only is None or name in text_only:
            expanded[f"{name}_text_only"] = SHORT_SEQUENCES + overrides + TEXT_ONLY
    return expanded


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("layouts")
    # Text-only references only where a text-only layout compares with them.
    text_only_references = {LAYOUTS[name][1] for name in TEXT_ONLY_LAYOUTS}
    _run_worker(1, _with_text_variants(REFERENCES, text_only_references), out_dir)
    for world_size in (2, 4):
        layouts = {
            name: overrides for name, (size, _, overrides) in LAYOUTS.items() if size == world_size
        }
        _run_worker(world_size, _with_text_variants(layouts, TEXT_ONLY_LAYOUTS), out_dir)
    return out_dir


def _load(out_dir: Path, name: str) -> list:
    return json.loads((out_dir / f"{name}.json").read_text())


CASES = [(layout, False) for layout in sorted(LAYOUTS)] + [
    (layout, True) for layout in TEXT_ONLY_LAYOUTS
]


@pytest.mark.parametrize(
    "layout, text_only",
    CASES,
    ids=[f"{layout}-{'text_only' if text else 'with_images'}" for layout, text in CASES],
)
def test_layout_matches_single_process(results, layout, text_only):
    _, reference_name, _ = LAYOUTS[layout]
    suffix = "_text_only" if text_only else ""
    reference = _load(results, reference_name + suffix)
    sharded = _load(results, layout + suffix)
    assert len(sharded) == len(reference) == NUM_STEPS
    for step, (ref, got) in enumerate(zip(reference, sharded), start=1):
        assert got["loss"] == pytest.approx(ref["loss"], rel=RELATIVE_TOLERANCE), f"step {step}"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RELATIVE_TOLERANCE), (
            f"step {step}"
        )
    assert sharded[-1]["loss"] < sharded[0]["loss"], "loss did not go down"
    # Vision FLOPs of the busiest data-parallel rank over the mean: 1 without images.
    assert all(step["vision_imbalance"] >= 1.0 for step in sharded)
    if text_only:
        assert all(step["num_images"] == 0 for step in sharded)
        assert all(step["vision_imbalance"] == 1.0 for step in sharded)
    else:
        assert sum(step["num_images"] for step in sharded) > 0
