"""``logging.*`` settings refused up front, each naming its field and the fix."""

from __future__ import annotations

import pytest

from mm1_megatron.config import load_config, validate_config
from tests.conftest import DEBUG_CONFIG


def _problems(*overrides) -> str:
    with pytest.raises(ValueError) as info:
        validate_config(load_config(DEBUG_CONFIG, list(overrides)))
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["logging.log_interval=0"], "logging.log_interval=0 must be >= 1"),
        (["logging.profile.start_step=-1"], "logging.profile.start_step=-1 must be >= 0"),
        (
            ["logging.profile.start_step=2", "logging.profile.num_steps=0"],
            "logging.profile.num_steps=0 must be >= 1",
        ),
        (
            ["logging.profile.start_step=900", "training.train_steps=100"],
            "comes after training.train_steps=100: nothing would be traced",
        ),
        (
            ["logging.profile.start_step=2", "logging.profile.ranks=[]"],
            "must name at least one global rank",
        ),
        (["logging.stragglers.interval=-1"], "logging.stragglers.interval=-1 must be >= 0"),
        (["logging.stragglers.threshold=0.9"], "logging.stragglers.threshold=0.9 must be > 1"),
        (["logging.stragglers.max_reported=0"], "max_reported=0 must be >= 1"),
    ],
)
def test_logging_refusals(overrides, expected):
    assert expected in _problems(*overrides)


def test_profiling_settings_validate():
    validate_config(
        load_config(
            DEBUG_CONFIG,
            ["logging.profile.start_step=5", "logging.profile.ranks=[0,3]"],
        )
    )
    # Off by default, whatever the other profile fields say.
    validate_config(load_config(DEBUG_CONFIG, ["logging.profile.num_steps=0"]))
