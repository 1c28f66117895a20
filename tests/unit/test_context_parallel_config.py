"""``parallel.context_parallel_size``: the world's arithmetic, and the settings a
context-parallel run refuses up front, each naming its field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from mm1_megatron.config import ParallelConfig, load_config, validate_config
from mm1_megatron.config.layout import check_world_size

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"
CP2 = "parallel.context_parallel_size=2"


def _problems(*overrides) -> str:
    with pytest.raises(ValueError) as info:
        validate_config(load_config(DEBUG, list(overrides)))
    return str(info.value)


@pytest.mark.parametrize(
    "tp, cp, pp, world, dp", [(1, 2, 1, 2, 1), (2, 2, 1, 8, 2), (2, 4, 2, 64, 4), (1, 3, 1, 6, 2)]
)
def test_context_parallel_ranks_come_out_of_data_parallel(tp, cp, pp, world, dp):
    par = ParallelConfig(
        tensor_parallel_size=tp, context_parallel_size=cp, pipeline_parallel_size=pp
    )
    assert check_world_size(par, world) == dp


def test_a_world_that_cp_does_not_divide_shows_the_arithmetic():
    with pytest.raises(ValueError, match=r"2 x 3 x 1 = 6"):
        check_world_size(ParallelConfig(tensor_parallel_size=2, context_parallel_size=3), 8)


def test_experts_may_span_context_parallel_ranks():
    # EP=2 inside DP x CP x TP = 1 x 2 x 1, as Megatron-Core's expert groups allow.
    par = ParallelConfig(context_parallel_size=2, expert_parallel_size=2)
    assert check_world_size(par, 2) == 1
    with pytest.raises(ValueError, match="context_parallel"):
        check_world_size(ParallelConfig(context_parallel_size=2, expert_parallel_size=4), 2)


def test_context_parallel_debug_runs_validate():
    validate_config(load_config(DEBUG, [CP2]))
    validate_config(
        load_config(
            DEBUG,
            [CP2, "parallel.tensor_parallel_size=2", "parallel.sequence_parallel=true"],
        )
    )
    # Transformer Engine's THD context parallelism (per-document split), with PP too.
    te = [CP2, "model.transformer_impl=transformer_engine"]
    validate_config(load_config(DEBUG, te))
    validate_config(load_config(DEBUG, [*te, "parallel.pipeline_parallel_size=2"]))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.context_parallel_size=0"], "parallel.context_parallel_size=0 must be >= 1"),
        ([CP2, "training.seq_length=250"], "use seq_length=248"),
        (
            # 2 x CP = 6 chunks, CP x TP = 6 positions per rank split over TP: 6
            ["parallel.context_parallel_size=3", "training.seq_length=256"],
            "not a multiple of 6",
        ),
        (
            [
                CP2,
                "parallel.tensor_parallel_size=4",
                "parallel.sequence_parallel=true",
                "training.seq_length=260",
            ],
            "not a multiple of 8",
        ),
        (
            [
                CP2,
                "model.transformer_impl=transformer_engine",
                "parallel.pipeline_parallel_size=2",
                "model.llm.moe.num_experts=4",
                "model.llm.moe.token_dispatcher=allgather",
            ],
            "set model.llm.moe.token_dispatcher=alltoall",
        ),
        ([CP2, "model.attention=dense_mask_reference"], "model.attention=per_document"),
        ([CP2, "training.objective=preference"], "train it with parallel.context_parallel_size=1"),
        ([CP2, "eval.interval=10", "eval.tasks=[coco_captions]"], "eval.tasks=[]"),
    ],
)
def test_context_parallel_refusals_name_the_field_and_the_fix(overrides, expected):
    assert expected in _problems(*overrides)
