"""Read config YAML that may be hostile: plain values only, bounded, errors with a place.

``parse_yaml`` is ``yaml.safe_load`` (no tags, so no code runs) plus three refusals made
on the composed node graph, before any Python object is built:

- aliases that would expand the document by more than ``MAX_ALIAS_NODES`` nodes (a
  "billion laughs" file of a few hundred bytes stands for billions of values, and so
  do repeated ``<<:`` merges);
- an alias inside the collection it names (a recursive value);
- a key given twice in one mapping (YAML keeps the last one silently).

Every failure, PyYAML's own included, is a ``ValueError`` naming the source (a file or
an override) and the line and column, so the command-line tools exit 2 with one line.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mm1_megatron.config.messages import cut

# Nodes that aliases may add to one document when expanded. Configs use anchors to
# share a section or a list (tens to hundreds of nodes); nothing needs more.
MAX_ALIAS_NODES = 10_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Refused(Exception):
    """A document refused by ``_check_nodes``; the message is complete."""


def _where(source: str, mark, column_offset: int = 0) -> str:
    if mark is None:
        return source
    column = mark.column + 1 + (column_offset if mark.line == 0 else 0)
    return f"{source}, line {mark.line + 1}, column {column}"


def _yaml_message(exc: yaml.YAMLError, source: str, column_offset: int) -> str:
    if not isinstance(exc, yaml.MarkedYAMLError):
        return f"{source}: invalid YAML: {cut(' '.join(str(exc).split()), 300)}"
    mark = exc.problem_mark or exc.context_mark
    what = " ".join(str(part) for part in (exc.context, exc.problem) if part)
    if exc.context and exc.context_mark is not None and exc.context_mark is not mark:
        started = _where("", exc.context_mark, column_offset).lstrip(", ")
        what = f"{exc.context} (from {started}): {exc.problem}"
    if "could not determine a constructor" in what:
        what += "; configs hold plain YAML values only, without tags such as !!python/..."
    return f"{_where(source, mark, column_offset)}: invalid YAML: {cut(what, 300)}"


def _check_nodes(root: Node, source: str, column_offset: int) -> None:
    """Refuse recursive aliases, duplicate keys and alias expansion past the limit."""
    sizes: Dict[int, Optional[int]] = {}  # id(node) -> expanded size; None while counting

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            known = sizes[key]
            if known is None:
                where = _where(source, node.start_mark, column_offset)
                raise _Refused(f"{where}: an alias refers to a collection that contains it")
            return known
        sizes[key] = None
        total = 1
        if isinstance(node, SequenceNode):
            for child in node.value:
                total += size(child)
        elif isinstance(node, MappingNode):
            _check_duplicate_keys(node, source, column_offset)
            for key_node, value_node in node.value:
                total += size(key_node) + size(value_node)
        sizes[key] = total
        return total

    expanded = size(root)
    if expanded - len(sizes) > MAX_ALIAS_NODES:
        raise _Refused(
            f"{source}: its aliases (*name) expand to {expanded:,} values, more than "
            f"{MAX_ALIAS_NODES:,} beyond the {len(sizes):,} written; write the values out "
            f"or use fewer nested aliases"
        )


def _check_duplicate_keys(node: MappingNode, source: str, column_offset: int) -> None:
    seen: Dict[tuple, Any] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
            continue
        ident = (key_node.tag, key_node.value)
        if ident in seen:
            first = seen[ident].line + 1
            where = _where(source, key_node.start_mark, column_offset)
            raise _Refused(
                f"{where}: key {cut(key_node.value, 80)!r} appears twice in one mapping "
                f"(first on line {first}); YAML would keep the last one silently"
            )
        seen[ident] = key_node.start_mark


def parse_yaml(text: str, source: str, column_offset: int = 0) -> Any:
    """The value of the one YAML document in ``text`` (None when empty), or a
    ``ValueError`` naming ``source`` and the place. ``column_offset`` shifts columns on
    the first line (an override's value starts after ``key=``)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, source, column_offset)
        return loader.construct_document(node)
    except _Refused as exc:
        raise ValueError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ValueError(_yaml_message(exc, source, column_offset)) from None
    except RecursionError:
        raise ValueError(f"{source}: nested too deeply to be a config") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a 5000-digit integer
        raise ValueError(f"{source}: unreadable value: {cut(str(exc), 200)}") from None
    finally:
        loader.dispose()
