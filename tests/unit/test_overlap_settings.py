"""How the communication-overlap settings resolve: on for GPU runs, off on CPU, explicit
values win, and the parameter all-gather only with the distributed optimizer."""

from __future__ import annotations

import pytest

from mm1_megatron.config.schema import ParallelConfig
from mm1_megatron.parallel.wrapping import resolve_overlap
from tests.conftest import make_tiny_config


@pytest.mark.parametrize(
    "settings, cuda, expected",
    [
        ({}, True, (True, True)),
        ({}, False, (False, False)),
        ({"use_distributed_optimizer": False}, True, (True, False)),
        ({"overlap_grad_reduce": False}, True, (False, True)),
        ({"overlap_grad_reduce": True, "overlap_param_gather": True}, False, (True, True)),
    ],
)
def test_overlap_resolves_per_machine(settings, cuda, expected):
    assert resolve_overlap(ParallelConfig(**settings), cuda=cuda) == expected


def test_param_gather_overlap_without_the_distributed_optimizer_is_refused():
    with pytest.raises(ValueError, match="parallel.use_distributed_optimizer=true"):
        make_tiny_config(
            "parallel.overlap_param_gather=true", "parallel.use_distributed_optimizer=false"
        )
