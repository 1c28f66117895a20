"""One checkpoint key layout for the local and the Transformer Engine layer specs.

A checkpoint written with either implementation loads into the other, in both
directions, for dense and MoE models. Three differences are reconciled here, before
``dist_checkpointing.load`` is asked for anything:

- **TE extra state.** Every TE module (``Linear``, ``LayerNormLinear``, ``GroupedLinear``,
  the ops-based ``RMSNorm``/``LayerNorm`` behind ``TENorm``) puts ``<module>._extra_state``
  in ``state_dict()`` (TE ``module/base.py`` ``get_extra_state``; ``ops/op.py``), and
  megatron-core's TE wrappers request it as a ``ShardedObject``
  (``make_sharded_tensors_for_checkpoint``). A checkpoint of the local spec, or one
  ``mm1 convert import`` wrote, never held it: requested extra state the checkpoint lacks
  is dropped from the request (TE then keeps its fresh FP8 metadata, as Megatron-LM's
  loader does). Nothing else may be absent.
- **TE core attention.** TE's ``DotProductAttention`` is a TE module too, so
  ``core_attention._extra_state`` is in ``state_dict()``, but megatron-core's
  ``TEDotProductAttention.sharded_state_dict`` returns ``{}`` (0.16.1
  ``extensions/transformer_engine.py:1436-1455``; 0.19.2 the same): it is never saved,
  never loaded, and ``load_module_state`` tolerates exactly such keys being missing.
- **The MoE pre-MLP norm.** Megatron-core's local GPT spec maps ``pre_mlp_layernorm.`` to
  ``mlp.linear_fc1.layer_norm_`` on every layer (0.16.1 ``gpt_layer_specs.py:417-420``,
  0.19.2 ``:459-461``), MoE layers included, although on a MoE layer TE keeps a separate
  ``pre_mlp_layernorm`` (MoE layers have no ``linear_fc1``). ``models/specs.py`` now
  keeps ``pre_mlp_layernorm.`` on MoE layers of the local spec too; local MoE checkpoints
  written before that are read under their old key (``LEGACY_MOE_NORM``), once, with a
  warning, and the next save writes the new one.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Set

from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

logger = logging.getLogger(__name__)

# ``_extra_state``, and ``_extra_state<i>``: megatron-core's TE grouped linear loads its
# per-expert extra states under those keys and merges them in a load hook (0.16.1
# ``extensions/transformer_engine.py:1569-1596``), unpickling each.
_EXTRA_STATE = re.compile(r"(^|\.)_extra_state\d*$")
# ``...decoder.layers.<i>.pre_mlp_layernorm.<param>`` as local MoE layers saved it before.
_MOE_NORM = re.compile(r"(^|.*\.)(decoder\.layers\.\d+\.)pre_mlp_layernorm\.(weight|bias)(.*)$")
LEGACY_MOE_NORM = r"\1\2mlp.linear_fc1.layer_norm_\3\4"


def is_extra_state(key: str) -> bool:
    return _EXTRA_STATE.search(key) is not None


@dataclass
class Reconciliation:
    """What ``reconcile_with_checkpoint`` changed in a load request."""

    renamed: List[str] = field(default_factory=list)  # keys read under their legacy name
    dropped: List[str] = field(default_factory=list)  # extra state the checkpoint lacks

    def log(self, checkpoint: Path) -> None:
        if self.renamed:
            logger.warning(
                "%s was written with the old key layout of local MoE layers (%d tensors such "
                "as %s); read under the old keys, the next save writes the new ones",
                checkpoint,
                len(self.renamed),
                self.renamed[0],
            )
        if self.dropped:
            logger.info(
                "%s holds no Transformer Engine extra state for %d modules (written with "
                "local layers or by mm1 convert): their FP8 metadata starts fresh",
                checkpoint,
                len(self.dropped),
            )


def checkpoint_keys(folder: Path) -> Set[str]:
    """Every tensor and object key a ``dist_checkpointing`` folder holds (metadata only)."""
    return {item.key for item in load_sharded_metadata(str(folder)).values()}


def _shardeds(tree: Any) -> Iterable[ShardedBase]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _shardeds(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _shardeds(value)
    elif isinstance(tree, ShardedBase):
        yield tree


def _without(tree: Any, drop: Callable[[Any], bool]) -> Any:
    """``tree`` with the leaves for which ``drop`` is true left out of their dicts."""
    if isinstance(tree, dict):
        return {k: _without(v, drop) for k, v in tree.items() if not drop(v)}
    if isinstance(tree, list):
        return [_without(v, drop) for v in tree]
    return tree


def reconcile_with_checkpoint(sharded_state_dict: Dict, folder: Path) -> Reconciliation:
    """Adapt a load request (in place) to the checkpoint in ``folder``: legacy MoE norm
    keys renamed, extra state the checkpoint lacks dropped. Anything else that is absent
    is left for ``dist_checkpointing.load`` to report."""
    available = checkpoint_keys(folder)
    result = Reconciliation()
    absent_extra: Set[int] = set()
    for item in _shardeds(sharded_state_dict):
        if item.key in available:
            continue
        legacy = _MOE_NORM.sub(LEGACY_MOE_NORM, item.key)
        if legacy != item.key and legacy in available:
            result.renamed.append(item.key)
            item.key = legacy
        elif isinstance(item, ShardedObject) and is_extra_state(item.key):
            result.dropped.append(item.key)
            absent_extra.add(id(item))
    if absent_extra:
        pruned = _without(sharded_state_dict, lambda leaf: id(leaf) in absent_extra)
        sharded_state_dict.clear()
        sharded_state_dict.update(pruned)
    return result
