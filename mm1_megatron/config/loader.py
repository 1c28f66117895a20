"""Build an ``MM1Config`` from YAML plus dotted overrides, and write it back out.

Unknown keys and values of the wrong type are rejected with the full dotted path, so
that a typo in a 30-node launch fails in the first second instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import yaml

from mm1_megatron.config.schema import MOVED_KEYS, MM1Config


def _describe(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _parse_float(text: str, path: str) -> float:
    # YAML 1.1 (PyYAML) reads exponents without a dot, like ``3e-4``, as strings.
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: expected a number, got {text!r}") from None


def choice_error(path: str, value: Any, choices: Sequence[Any]) -> str:
    """The one message for a value outside a field's ``Literal`` choices."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{path}={value!r} is not one of {list(choices)}{hint}"


def _coerce(value: Any, tp, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where lossless."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(choice_error(path, value, choices))
        return value
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict) and path in MOVED_KEYS:
            raise ValueError(_moved_message(path, value))
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build_dataclass(tp, value, path)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _parse_float(value, path)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{path}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {_describe(tp)} at {path}")


def _dotted(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _moved_message(old: str, value: Any) -> str:
    new = MOVED_KEYS[old]
    return (
        f"config key '{old}' has moved to '{new}': write {new}: {value!r} in YAML "
        f"(or {new}={value} on the command line)"
    )


def _build_dataclass(cls, values: Dict[str, Any], path: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints and _dotted(path, key) in MOVED_KEYS:
            raise ValueError(_moved_message(_dotted(path, key), value))
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            where = f"{path}.{key}" if path else key
            raise ValueError(f"Unknown config key '{where}'.{hint} Valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    return cls(**kwargs)


# Top-level sections of the same stacked YAML files that other tools read and the trainer
# skips: ``cluster`` belongs to ``mm1-launch`` (mm1_megatron/launch, docs/cluster.md), so a
# cluster overlay can be passed to both.
LAUNCHER_SECTIONS = ("cluster",)


def section_from_dict(cls, values: Dict[str, Any], path: str):
    """Build the dataclass ``cls`` from a mapping with the checks and messages of the
    config loader; ``path`` is the dotted section name used in those messages."""
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of {cls.__name__} fields, got {values!r}")
    return _build_dataclass(cls, values, path)


def config_from_dict(values: Dict[str, Any]) -> MM1Config:
    values = {k: v for k, v in (values or {}).items() if k not in LAUNCHER_SECTIONS}
    return _build_dataclass(MM1Config, values, "")


def _set_dotted(tree: Dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"Override '{dotted_key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (``4``, ``1e-4``, ``null``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Override '{item}' must look like section.field=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    return tree


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_tree(path: Union[str, Path], _seen: tuple = ()) -> Dict[str, Any]:
    """Load a YAML config, first merging the files its ``include:`` list names.

    Included paths are relative to the including file; later files and the file's own
    keys win. This lets the MM1 configs share one encoder definition.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"Config include cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    if not path.is_file():
        raise ValueError(f"Config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    includes = tree.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: Dict[str, Any] = {}
    for include in includes:
        merged = _deep_merge(merged, read_yaml_tree(path.parent / include, _seen + (path,)))
    return _deep_merge(merged, tree)


ConfigPaths = Union[str, Path, Sequence[Union[str, Path]], None]


def load_config(path: ConfigPaths = None, overrides: Sequence[str] = ()) -> MM1Config:
    """Read YAML files (or start from defaults), apply overrides, and type-check it all.

    Several files merge left to right (a cluster or experiment overlay on a model
    config): mappings merge key by key, anything else in a later file replaces the
    earlier value. Dotted overrides apply last.
    """
    return config_from_dict(apply_overrides(read_config_trees(path), overrides))


def read_config_trees(path: ConfigPaths = None) -> Dict[str, Any]:
    """The merged tree of one or several YAML files (``load_config`` before overrides)."""
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    tree: Dict[str, Any] = {}
    for one in paths:
        tree = _deep_merge(tree, read_yaml_tree(one))
    return tree


def config_to_dict(config) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: MM1Config, path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML; loading it back gives an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path
