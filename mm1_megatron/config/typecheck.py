"""Check a YAML tree against the config dataclasses, collecting every problem.

Each unknown key and each value of the wrong type adds one message to a ``Problems``;
the field keeps its default and the check goes on, so one run lists every mistake.
``Problems.fields`` names the fields whose given value was not used (the mistyped ones,
the targets of moved keys and the suggested spelling of unknown ones): the loader leaves
out value checks that name them, since those would judge a default the user never chose.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Dict, List, Sequence, Set, Union

from mm1_megatron.config.messages import cut, short
from mm1_megatron.config.schema import MOVED_KEYS

INT_LIMIT = 2**63  # no count, size or step of a run comes near; larger ints are typos

_INVALID = object()  # what ``_coerce`` returns for a value it reported


@dataclasses.dataclass
class Problems:
    messages: List[str] = dataclasses.field(default_factory=list)
    fields: Set[str] = dataclasses.field(default_factory=set)

    def fail(self, message: str) -> object:
        self.messages.append(message)
        return _INVALID


def _did_you_mean(value: Any, choices: Sequence[Any]) -> str:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def choice_error(path: str, value: Any, choices: Sequence[Any]) -> str:
    """The one message for a value outside a field's ``Literal`` choices."""
    return f"{path}={short(value)} is not one of {list(choices)}{_did_you_mean(value, choices)}"


def key_choice_error(path: str, key: Any, choices: Sequence[Any]) -> str:
    """The one message for a key of the mapping at ``path`` outside its ``Literal`` keys."""
    where = f"{path}.{cut(str(key), 80)}"
    return f"{where}: {short(key)} is not one of {list(choices)}{_did_you_mean(key, choices)}"


def moved_message(old: str, value: Any) -> str:
    new = MOVED_KEYS[old]
    return (
        f"config key '{old}' has moved to '{new}': write {new}: {short(value)} in YAML "
        f"(or {new}={cut(str(value))} on the command line)"
    )


def _parse_float(text: str) -> Any:
    # YAML 1.1 (PyYAML) reads exponents without a dot, like ``3e-4``, as strings.
    try:
        return float(text)
    except ValueError:
        return text


def _coerce(value: Any, tp, path: str, problems: Problems) -> Any:
    """``value`` checked against the annotation ``tp`` and converted where lossless, or
    ``_INVALID`` after adding the problem(s) to ``problems``."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            return problems.fail(choice_error(path, value, choices))
        return value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict) and path in MOVED_KEYS:
            problems.fields.add(MOVED_KEYS[path])
            return problems.fail(moved_message(path, value))
        if not isinstance(value, dict):
            return problems.fail(
                f"{path}: expected a mapping of {tp.__name__} fields, got {short(value)}"
            )
        return build_dataclass(tp, value, path, problems)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            return problems.fail(f"{path}: expected a list, got {short(value)}")
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return _INVALID if any(v is _INVALID for v in items) else items
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            return problems.fail(f"{path}: expected a mapping, got {short(value)}")
        key_tp, val_tp = typing.get_args(tp)
        keys = typing.get_args(key_tp) if typing.get_origin(key_tp) is typing.Literal else None
        items = {
            str(k): (
                problems.fail(key_choice_error(path, k, keys))
                if keys is not None and k not in keys
                else _coerce(v, val_tp, f"{path}.{cut(str(k), 80)}", problems)
            )
            for k, v in value.items()
        }
        return _INVALID if any(v is _INVALID for v in items.values()) else items
    return _coerce_scalar(value, tp, path, problems)


def _coerce_scalar(value: Any, tp, path: str, problems: Problems) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            return problems.fail(f"{path}: expected true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return problems.fail(f"{path}: expected an integer, got {short(value)}")
        if not -INT_LIMIT < value < INT_LIMIT:
            return problems.fail(f"{path}: {short(value)} is out of range (|n| < 2**63)")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _parse_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return problems.fail(f"{path}: expected a number, got {short(value)}")
        try:
            return float(value)
        except OverflowError:
            return problems.fail(f"{path}: {short(value)} is out of range for a number")
    if tp is str:
        if not isinstance(value, str):
            return problems.fail(f"{path}: expected a string, got {short(value)}")
        return value
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    raise AssertionError(f"unsupported annotation {name} at {path}")


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def build_dataclass(cls, values: Dict[Any, Any], path: str, problems: Problems):
    """``cls`` from the mapping ``values``; fields with a problem keep their default."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = _dotted(path, cut(str(key), 80))
        if key not in hints and where in MOVED_KEYS:
            problems.fields.add(MOVED_KEYS[where])
            problems.fail(moved_message(where, value))
            continue
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.fields.update(_dotted(path, name) for name in close)
            problems.fail(f"Unknown config key '{where}'.{hint} Valid keys: {', '.join(names)}")
            continue
        result = _coerce(value, hints[key], where, problems)
        if result is _INVALID:
            problems.fields.add(where)
        else:
            kwargs[key] = result
    return cls(**kwargs)
