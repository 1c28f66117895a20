"""Build an ``MM1Config`` from YAML plus dotted overrides, and write it back out.

Every problem is reported at once, in one ``ValueError``: first whatever stops the files
and overrides from being read (YAML errors with their line and column, missing files,
malformed overrides), then every unknown key and value of the wrong type with its full
dotted path, together with the value checks of ``validate_config`` that do not touch a
field with such a problem. A typo in a 30-node launch fails in the first second, once.
YAML is read by ``safe_yaml.parse_yaml`` (no tags, bounded alias expansion).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

import yaml

from mm1_megatron.config.messages import cut, problems_error, short
from mm1_megatron.config.safe_yaml import parse_yaml
from mm1_megatron.config.schema import MM1Config
from mm1_megatron.config.typecheck import Problems, build_dataclass, choice_error

__all__ = [
    "LAUNCHER_SECTIONS",
    "apply_overrides",
    "choice_error",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "read_config_trees",
    "read_yaml_tree",
    "save_config",
    "section_from_dict",
]

MAX_CONFIG_BYTES = 4 * 2**20  # a config is kilobytes; a bigger file is the wrong file
MAX_CONFIG_FILES = 256  # files read for one --config, includes included

# Top-level sections of the same stacked YAML files that other tools read and the trainer
# skips: ``cluster`` belongs to ``mm1 launch`` (mm1_megatron/launch, docs/cluster.md), so a
# cluster overlay can be passed to both.
LAUNCHER_SECTIONS = ("cluster",)


def section_from_dict(cls, values: Dict[str, Any], path: str):
    """Build the dataclass ``cls`` from a mapping with the checks and messages of the
    config loader; ``path`` is the dotted section name used in those messages."""
    if not isinstance(values, dict):
        raise ValueError(
            f"{path}: expected a mapping of {cls.__name__} fields, got {short(values)}"
        )
    problems = Problems()
    section = build_dataclass(cls, values, path, problems)
    if problems.messages:
        raise problems_error(problems.messages)
    return section


def config_from_dict(values: Dict[str, Any]) -> MM1Config:
    """The typed config of a merged tree; ``ValueError`` lists every unknown key and wrong
    type, and the value checks that do not involve those fields."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ValueError(f"the config must be a mapping of sections, got {short(values)}")
    values = {k: v for k, v in values.items() if k not in LAUNCHER_SECTIONS}
    problems = Problems()
    config = build_dataclass(MM1Config, values, "", problems)
    if problems.messages:
        raise problems_error(problems.messages + _value_checks_beside(config, problems.fields))
    return config


def _value_checks_beside(config: MM1Config, skipped: Iterable[str]) -> List[str]:
    """``validate_config``'s messages about ``config`` (which holds defaults where the
    user's value was refused) that name none of the ``skipped`` fields, even by their last
    name: a check on a default the user did not choose would only mislead."""
    from mm1_megatron.config.validation import validate_config  # imports this module

    try:
        validate_config(config)
        return []
    except ValueError as exc:
        lines = str(exc).split("\n  - ")[1:]  # validate_config's one-line-per-problem list
    names = {field.rsplit(".", 1)[-1] for field in skipped}
    if not names:
        return lines
    touches = re.compile(r"\b(?:" + "|".join(re.escape(name) for name in names) + r")\b")
    return [line for line in lines if not touches.search(line)]


def _set_dotted(tree: Dict[str, Any], dotted_key: str, value: Any) -> None:
    parts = dotted_key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(
                f"Override '{cut(dotted_key)}': '{cut(part)}' is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def _apply_overrides(tree: Dict[str, Any], overrides: Sequence[str], problems: List[str]):
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"Override '{cut(item)}' must look like section.field=value")
            continue
        try:
            source = f"override '{cut(item)}'"
            value = parse_yaml(raw, source, column_offset=len(key) + 1) if raw.strip() else ""
            _set_dotted(tree, key.strip(), value)
        except ValueError as exc:
            problems.append(str(exc))
    return tree


def apply_overrides(tree: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (``4``, ``1e-4``, ``null``).
    ``ValueError`` lists every malformed override."""
    problems: List[str] = []
    _apply_overrides(tree, overrides, problems)
    if problems:
        raise problems_error(problems)
    return tree


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(
                f"{path}: {size:,} bytes is too big for a config file (at most "
                f"{MAX_CONFIG_BYTES:,}); is it the right file?"
            )
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text (byte {exc.start}); is it a YAML config?"
        ) from None
    except OSError as exc:
        raise ValueError(f"Cannot read config file {path}: {exc.strerror or exc}") from None


def _includes(value: Any, path: Path) -> List[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ValueError(f"{path}: include must be a file name or a list of them, got {short(value)}")


def read_yaml_tree(path: Union[str, Path], _seen: tuple = (), _count=None) -> Dict[str, Any]:
    """Load a YAML config, first merging the files its ``include:`` list names.

    Included paths are relative to the including file; later files and the file's own
    keys win. This lets the MM1 configs share one encoder definition.
    """
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"Config include cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    if not path.is_file():
        raise ValueError(f"Config file not found: {path}")
    count = [0] if _count is None else _count
    count[0] += 1
    if count[0] > MAX_CONFIG_FILES:
        raise ValueError(
            f"{path}: more than {MAX_CONFIG_FILES} files read through include: (the same "
            f"files included over and over?)"
        )
    tree = parse_yaml(_read_text(path), str(path))
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    merged: Dict[str, Any] = {}
    for include in _includes(tree.pop("include", None), path):
        merged = _deep_merge(merged, read_yaml_tree(path.parent / include, _seen + (path,), count))
    return _deep_merge(merged, tree)


ConfigPaths = Union[str, Path, Sequence[Union[str, Path]], None]


def _read_trees(path: ConfigPaths, problems: List[str]) -> Dict[str, Any]:
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    tree: Dict[str, Any] = {}
    for one in paths:
        try:
            tree = _deep_merge(tree, read_yaml_tree(one))
        except ValueError as exc:
            problems.append(str(exc))
    return tree


def load_config(path: ConfigPaths = None, overrides: Sequence[str] = ()) -> MM1Config:
    """Read YAML files (or start from defaults), apply overrides, and type-check it all.

    Several files merge left to right (a cluster or experiment overlay on a model
    config): mappings merge key by key, anything else in a later file replaces the
    earlier value. Dotted overrides apply last. Files or overrides that cannot be read
    are all reported before any type check (the tree would be incomplete).
    """
    problems: List[str] = []
    tree = _apply_overrides(_read_trees(path, problems), overrides, problems)
    if problems:
        raise problems_error(problems)
    return config_from_dict(tree)


def read_config_trees(path: ConfigPaths = None) -> Dict[str, Any]:
    """The merged tree of one or several YAML files (``load_config`` before overrides)."""
    problems: List[str] = []
    tree = _read_trees(path, problems)
    if problems:
        raise problems_error(problems)
    return tree


def config_to_dict(config) -> Dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: MM1Config, path: Union[str, Path]) -> Path:
    """Write the resolved config as YAML; loading it back gives an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path
