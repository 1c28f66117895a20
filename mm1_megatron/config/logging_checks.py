"""Config checks of ``logging.*``. Run by ``validate_config`` (``validation.py``)."""

from __future__ import annotations

from mm1_megatron.config.check_errors import Errors as _Errors
from mm1_megatron.config.schema import MM1Config


def check_logging(cfg: MM1Config, err: _Errors) -> None:
    log = cfg.logging
    err.check(log.log_interval >= 1, f"logging.log_interval={log.log_interval} must be >= 1")
    _check_stragglers(cfg, err)
    profile, p = log.profile, "logging.profile"
    err.check(
        profile.start_step >= 0,
        f"{p}.start_step={profile.start_step} must be >= 0 (0: no profiling)",
    )
    if profile.start_step == 0:
        return
    err.check(profile.num_steps >= 1, f"{p}.num_steps={profile.num_steps} must be >= 1")
    err.check(
        profile.start_step <= cfg.training.train_steps,
        f"{p}.start_step={profile.start_step} comes after training.train_steps="
        f"{cfg.training.train_steps}: nothing would be traced; pick a step of the run",
    )
    err.check(
        bool(profile.ranks) and min(profile.ranks, default=0) >= 0,
        f"{p}.ranks={profile.ranks} must name at least one global rank (>= 0), e.g. [0]",
    )


def _check_stragglers(cfg: MM1Config, err: _Errors) -> None:
    settings, p = cfg.logging.stragglers, "logging.stragglers"
    err.check(settings.interval >= 0, f"{p}.interval={settings.interval} must be >= 0 (0: off)")
    err.check(
        settings.threshold > 1.0,
        f"{p}.threshold={settings.threshold} must be > 1 (a rank is slow when its own work "
        "exceeds threshold x the median), e.g. 1.2",
    )
    err.check(settings.max_reported >= 1, f"{p}.max_reported={settings.max_reported} must be >= 1")
