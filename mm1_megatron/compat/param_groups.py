"""Loading optimizer state into param groups whose LR settings changed since the save.

A distributed optimizer's checkpoint stores its param groups, and megatron-core matches
each live group to a saved one by the values of ``param_group_identifier_keys``:

- 0.16.1: ``wd_mult``, ``lr_mult``, ``is_expert_parallel``, ``is_decoupled_lr``;
- 0.19.2: also every per-group override, ``max_lr``, ``min_lr``, ``start_wd``, ``end_wd``
  among them, so a resume with another peak LR, floor or weight decay
  (``optimizer.schedule_on_resume=config`` or ``=checkpoint``) fails with a bare
  ``KeyError`` of the identifier tuple.

``align_saved_param_groups`` gives the saved groups the live groups' schedule values
where only those differ (pairing groups that agree on every other identifier, in order),
and returns the saved values it replaced so that the caller can put them back on the
live groups when the checkpoint's schedule is to be kept. On 0.16 it does nothing
(feature detection on the identifier keys).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, Iterator, List, Tuple

SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")


def _identifier_keys() -> Tuple[str, ...]:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(param_group_identifier_keys)


def identifiers_include_schedule() -> bool:
    return any(key in _identifier_keys() for key in SCHEDULE_KEYS)


def _value(group: Dict[str, Any], key: str) -> Any:
    return group.get(key, group.get(f"pre_{key}"))


def _structure(group: Dict[str, Any]) -> Tuple[Any, ...]:
    """The identifiers of a group other than its schedule values."""
    return tuple(_value(group, k) for k in _identifier_keys() if k not in SCHEDULE_KEYS)


def _identity(group: Dict[str, Any]) -> Tuple[Any, ...]:
    return tuple(_value(group, key) for key in _identifier_keys())


def _saved_group_lists(tree: Any) -> Iterator[List[Dict[str, Any]]]:
    """Every ``param_groups`` list in a loaded (possibly chained) optimizer state."""
    if isinstance(tree, dict):
        groups = tree.get("param_groups")
        if isinstance(groups, list) and all(isinstance(g, dict) for g in groups):
            yield groups
        for key, value in tree.items():
            if key != "param_groups":
                yield from _saved_group_lists(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _saved_group_lists(value)


def align_saved_param_groups(loaded_state: Any, live_groups: List[Dict[str, Any]]):
    """Rewrite the schedule values of saved groups that no live group matches to those of
    the live group they pair with. Returns ``{live group index: saved values}`` for every
    group rewritten. Raises ``ValueError`` when the groups differ in more than that."""
    if not identifiers_include_schedule():
        return {}
    live_identities = {_identity(group) for group in live_groups}
    live_by_structure = defaultdict(list)
    for index, group in enumerate(live_groups):
        live_by_structure[_structure(group)].append(index)
    replaced: Dict[int, Dict[str, Any]] = {}
    for saved_groups in _saved_group_lists(loaded_state):
        if all(_identity(group) in live_identities for group in saved_groups):
            continue
        position = defaultdict(int)
        for group in saved_groups:
            structure = _structure(group)
            candidates = live_by_structure.get(structure, [])
            if position[structure] >= len(candidates):
                raise ValueError(
                    "the optimizer's parameter groups differ from the checkpoint's (a module "
                    "added to or removed from optimizer.lr_multipliers, or another weight-"
                    "decay split): the checkpoint's optimizer state cannot be loaded"
                )
            index = candidates[position[structure]]
            position[structure] += 1
            saved = {key: group[key] for key in SCHEDULE_KEYS if key in group}
            if any(saved.get(key) != live_groups[index].get(key) for key in saved):
                replaced[index] = saved
                group.update({key: live_groups[index][key] for key in saved})
    return replaced
