"""Resuming when the config's LR schedule differs from the checkpoint's.

Megatron-Core's ``OptimizerParamScheduler.load_state_dict`` silently takes the saved
schedule: a run extended from 4 to 8 ``training.train_steps`` would spend steps 5-8 at the
floor LR. So the schedule this config defines is compared with the saved one first, and
``optimizer.schedule_on_resume`` says what a difference means:

- ``strict`` (default): stop before loading (exit 2), naming each field and both values;
- ``checkpoint``: keep the saved schedule (the run continues as it was planned);
- ``config``: this config's schedule, evaluated at the checkpoint's step (extending a
  run: the cosine is stretched from where the run stands).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from mm1_megatron.checkpoint.diagnostics import saved_config

logger = logging.getLogger(__name__)

# Each saved scheduler field and the config field that sets it (training/optimizer.py).
SCHEDULE_FIELDS = {
    "max_lr": "optimizer.lr",  # the peak LR (optimizer.lr, or optimizer.lr_rule's)
    "min_lr": "optimizer.min_lr_ratio",
    "lr_warmup_steps": "optimizer.warmup_steps",
    "lr_decay_steps": "training.train_steps",
    "lr_decay_style": "optimizer (decay style)",
    "start_wd": "optimizer.weight_decay",
    "end_wd": "optimizer.weight_decay",
    "wd_incr_steps": "training.train_steps",
    "wd_incr_style": "optimizer (weight-decay style)",
}


GROUP_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")  # a param group's own schedule


@dataclass
class ScheduleDifference:
    field: str  # the dotted config field
    saved: Any
    current: Any


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _lookup(tree: Optional[Dict[str, Any]], dotted: str) -> Any:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def schedule_differences(
    saved: Dict[str, Any], current: Dict[str, Any], checkpoint: Path, config: Any
) -> List[ScheduleDifference]:
    """One entry per config field whose schedule differs from the saved one. Values are
    the fields' own (from the checkpoint's ``config.yaml``) where they differ there, else
    the scheduler's resolved numbers (e.g. a peak LR both configs derive by rule)."""
    saved_tree = saved_config(checkpoint)
    found: Dict[str, ScheduleDifference] = {}
    for key, dotted in SCHEDULE_FIELDS.items():
        if key not in saved or key not in current or _same(saved[key], current[key]):
            continue
        if dotted in found:
            continue
        there, here = _lookup(saved_tree, dotted), _lookup_config(config, dotted)
        if there is None or here is None or _same(there, here):
            there, here = saved[key], current[key]
            dotted = dotted if "(" in dotted else f"{dotted} ({key})"
        found[dotted] = ScheduleDifference(dotted, there, here)
    multipliers = _multipliers(_lookup(saved_tree, "optimizer.lr_multipliers"))
    if saved_tree is not None and multipliers != _multipliers(config.optimizer.lr_multipliers):
        found["optimizer.lr_multipliers"] = ScheduleDifference(
            "optimizer.lr_multipliers", multipliers, _multipliers(config.optimizer.lr_multipliers)
        )
    return list(found.values())


def _multipliers(values: Any) -> Dict[str, float]:
    """Per-module LR multipliers, those of 1 left out (they change nothing)."""
    if not isinstance(values, dict):
        return {}
    return {name: value for name, value in sorted(values.items()) if value != 1.0}


def _lookup_config(config: Any, dotted: str) -> Any:
    value = config
    for key in dotted.split("."):
        if not hasattr(value, key):
            return None
        value = getattr(value, key)
    return value


def check_schedule(scheduler, saved: Dict[str, Any], *, policy: str, checkpoint: Path, config):
    """Raise ``ValueError`` when ``policy`` is ``strict`` and the schedule of ``scheduler``
    (built from ``config``) differs from the saved state ``saved``. Called before anything
    is loaded, so a refused resume costs seconds."""
    differences = schedule_differences(saved, scheduler.state_dict(), checkpoint, config)
    _refuse_if_strict(differences, policy, checkpoint, saved)


def _refuse_if_strict(differences, policy: str, checkpoint: Path, saved: Dict[str, Any]):
    if differences and policy == "strict":
        raise ValueError(
            f"the LR schedule of this run differs from checkpoint {checkpoint}'s: "
            f"{_listed(differences)}. Choose one: optimizer.schedule_on_resume=config (this "
            f"config's schedule, from step {saved.get('num_steps', 0)}) or "
            "optimizer.schedule_on_resume=checkpoint (keep the saved one)"
        )


def planned_group_lrs(optimizer) -> List[Dict[str, Any]]:
    """Each parameter group's schedule values (peak and floor LR, weight decay) as this
    config built them: loading the optimizer's state may replace them."""
    return [{key: group.get(key) for key in GROUP_KEYS} for group in optimizer.param_groups]


def restore_schedule(
    scheduler,
    saved: Dict[str, Any],
    *,
    policy: str,
    checkpoint: Path,
    config,
    planned_groups: List[Dict[str, Any]],
    saved_groups: Dict[int, Dict[str, Any]],
):
    """Set ``scheduler`` and the optimizer's param groups to the checkpoint's step, with
    the saved schedule or this config's as ``policy`` says. Call after the optimizer's
    state is loaded: this sets its LR. ``planned_groups``: ``planned_group_lrs`` before
    that load; ``saved_groups``: the saved values of groups the load did not restore
    (``compat.param_groups.align_saved_param_groups``)."""
    differences = schedule_differences(saved, scheduler.state_dict(), checkpoint, config)
    _refuse_if_strict(differences, policy, checkpoint, saved)
    groups = scheduler.optimizer.param_groups
    step = saved.get("num_steps", 0)
    if not differences or policy == "checkpoint":
        if differences:
            logger.warning("keeping the checkpoint's LR schedule (%s)", _listed(differences))
        for index, values in saved_groups.items():
            groups[index].update(values)
        scheduler.load_state_dict(saved)
        return
    assert policy == "config", policy
    logger.warning("using this config's LR schedule from step %d (%s)", step, _listed(differences))
    for group, values in zip(groups, planned_groups):
        group.update({key: value for key, value in values.items() if key in group})
    scheduler.num_steps = 0
    scheduler.step(increment=step)


def _listed(differences: List[ScheduleDifference]) -> str:
    return "; ".join(
        f"{d.field}: {d.saved} in the checkpoint, {d.current} now" for d in differences
    )
