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


def test_an_enabled_tracker_that_is_not_installed_is_refused(monkeypatch):
    import importlib.util

    from mm1_megatron.config.validation import validate_environment

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = load_config(DEBUG_CONFIG, ["logging.wandb.enabled=true"])
    with pytest.raises(ValueError, match=r"pip install -e \.\[wandb\]"):
        validate_environment(cfg, cuda_available=False)


def test_a_tracker_that_fails_mid_run_warns_once_and_is_left_off(caplog):
    from mm1_megatron.training.trackers import GuardedTracker

    class Failing:
        calls = 0

        def log(self, step, scalars):
            Failing.calls += 1
            raise ConnectionError("no route to host")

        def close(self):
            raise AssertionError("a failed tracker is not called again")

    guarded = GuardedTracker("wandb", Failing())
    with caplog.at_level("WARNING"):
        for step in range(3):
            guarded.log(step, {"loss": 1.0})
        guarded.close()
    assert Failing.calls == 1
    assert caplog.text.count("wandb: log failed (ConnectionError: no route to host)") == 1
