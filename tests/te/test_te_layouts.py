"""Transformer Engine layers at TP=2 with sequence parallelism, and TE checkpoints resharded.

The TE-tier counterparts of ``tests/parallel/test_layouts.py`` and
``tests/checkpoint/test_resume_and_reshard.py``: Megatron-Core's TE wrappers pass
``tp_group``/``tp_size``, ``parallel_mode`` and ``sequence_parallel`` to TE's ``Linear``,
``LayerNormLinear`` and ``GroupedLinear``, which shard their weights and issue the
column-parallel all-gather and row-parallel reduce-scatter themselves; on the stand-in
those paths run only here.

Four sets of processes (``tests/parallel/layout_worker.py``, several layouts per start):

1. one process: the dense and MoE tiny models with TE layers at TP=1, ``2 * N`` steps,
   saving at step ``N`` (the references);
2. two processes: the same at TP=2 with sequence parallelism (MoE: expert-TP 2 through
   ``GroupedLinear``'s column/row shapes), the dense model at TP=2 without it (the
   column-parallel input-gradient all-reduce; the vision encoder takes that path in every
   TP=2 run), and the dense TP=1 checkpoint resumed at TP=2 with sequence parallelism;
3. one process: the TP=2 checkpoints resumed at TP=1;
4. context parallelism through TE's THD attention (``batch.document_split``: one padded
   THD row per micro-batch, each rank its chunks of every document; Megatron-Core's
   per-document RoPE on them): the dense and MoE models at CP=2 (two processes, with the
   TP=2 runs of step 2; the experts route the padding too, dropless, so the real tokens'
   outputs do not change), and with four processes at CP=2 x TP=2 with sequence parallelism and at
   CP=2 x PP=2 (the vision stage; stages send each activation's shape first, as the THD
   row's length varies).

Every loss and gradient norm must match the TP=1 run of the same model within 1e-5
relative, the tolerance of the local-spec layout tests: TP and SP change only how fp32
sums are split and reduced (about 1e-7 relative per step), while a wrong shard, a missing
all-gather / reduce-scatter or an unreduced sequence-parallel norm gradient moves them by
1e-3 or more. A resume continues at the saved step with the same ``train_steps``, so the
saved LR schedule matches the config (``schedule_on_resume`` stays ``strict``); the
default ``checkpoint.optimizer_sharding=fully_reshardable`` is what lets the optimizer
state change TP. The MoE variants switch off the router's auxiliary losses, which are not
layout-invariant by design (see ``tests/parallel/test_layouts.py``).
"""

from __future__ import annotations

import pytest

from tests.te.conftest import SKIP_REASON, TE_MODE

if TE_MODE is None:  # module fixtures start processes: skip before they are set up
    pytest.skip(SKIP_REASON, allow_module_level=True)

import json
from pathlib import Path

from tests.conftest import TINY_OVERRIDES
from tests.te.conftest import TE_OVERRIDES

N = 2
RELATIVE_TOLERANCE = 1e-5

TINY = list(TINY_OVERRIDES) + list(TE_OVERRIDES)
MOE = [
    "model.llm.moe.num_experts=4",
    "model.llm.moe.top_k=2",
    "model.llm.moe.grouped_gemm=true",
    "model.llm.moe.aux_loss_coeff=0",
    "model.llm.moe.z_loss_coeff=0",
]
TP2 = ["parallel.tensor_parallel_size=2"]
TP2_SP = TP2 + ["parallel.sequence_parallel=true"]
CP2 = ["parallel.context_parallel_size=2"]
MODELS = {"dense": TINY, "moe": TINY + MOE}


def _save(out: Path, name: str) -> list:
    return [f"checkpoint.save_dir={out / 'ckpt' / name}", f"checkpoint.save_interval={N}"]


def _resume(out: Path, name: str) -> list:
    return [f"checkpoint.load_dir={out / 'ckpt' / name / f'step_{N:08d}'}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    from tests.parallel.test_layouts import _run_worker

    out = tmp_path_factory.mktemp("te_layouts")
    _run_worker(
        1,
        {f"{model}_tp1": base + _save(out, f"{model}_tp1") for model, base in MODELS.items()},
        out,
        steps=2 * N,
    )
    two_processes = {
        f"{model}_tp2_sp": base + TP2_SP + _save(out, f"{model}_tp2_sp")
        for model, base in MODELS.items()
    }
    two_processes["dense_tp2"] = TINY + TP2
    two_processes["dense_tp1_to_tp2_sp"] = TINY + TP2_SP + _resume(out, "dense_tp1")
    two_processes["dense_cp2"] = TINY + CP2
    two_processes["moe_cp2"] = TINY + MOE + CP2
    _run_worker(2, two_processes, out, steps=2 * N)
    four_processes = {
        "dense_cp2_tp2_sp": TINY + CP2 + TP2_SP,
        "dense_cp2_pp2": TINY + CP2 + ["parallel.pipeline_parallel_size=2"],
    }
    _run_worker(4, four_processes, out, steps=2 * N)
    _run_worker(
        1,
        {
            f"{model}_tp2_sp_to_tp1": base + _resume(out, f"{model}_tp2_sp")
            for model, base in MODELS.items()
        },
        out,
        steps=2 * N,
    )
    return out


def _load(out: Path, name: str) -> list:
    return json.loads((out / f"{name}.json").read_text())


def _assert_same_steps(reference: list, got: list, first_step: int) -> None:
    assert len(got) == len(reference)
    for step, (ref, value) in enumerate(zip(reference, got), start=first_step):
        assert value["loss"] == pytest.approx(ref["loss"], rel=RELATIVE_TOLERANCE), f"step {step}"
        assert value["grad_norm"] == pytest.approx(ref["grad_norm"], rel=RELATIVE_TOLERANCE), (
            f"step {step}"
        )


@pytest.mark.parametrize(
    "model, layout",
    [
        ("dense", "tp2"),
        ("dense", "tp2_sp"),
        ("moe", "tp2_sp"),
        ("dense", "cp2"),
        ("dense", "cp2_tp2_sp"),
        ("dense", "cp2_pp2"),
        ("moe", "cp2"),
    ],
)
def test_tensor_parallel_matches_tp1(runs, model, layout):
    reference, sharded = _load(runs, f"{model}_tp1"), _load(runs, f"{model}_{layout}")
    assert len(reference) == 2 * N
    _assert_same_steps(reference, sharded, first_step=1)
    assert sharded[-1]["loss"] < sharded[0]["loss"], "loss did not go down"
    assert sum(step["num_images"] for step in sharded) > 0


@pytest.mark.parametrize(
    "source, target",
    [
        ("dense_tp2_sp", "dense_tp2_sp_to_tp1"),
        ("moe_tp2_sp", "moe_tp2_sp_to_tp1"),
        ("dense_tp1", "dense_tp1_to_tp2_sp"),
    ],
)
def test_checkpoint_reshards_and_continues(runs, source, target):
    """Steps ``N+1..2N`` after the reshard are the uninterrupted run's (to 1e-5)."""
    uninterrupted, resumed = _load(runs, source), _load(runs, target)
    assert len(resumed) == N
    _assert_same_steps(uninterrupted[N:], resumed, first_step=N + 1)
