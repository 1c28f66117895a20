"""Move tensors between a Hugging Face folder and our model, one ``Unit`` at a time."""

from __future__ import annotations

import logging
from typing import Callable, Dict, Iterator, List, Optional, Set, Tuple

import torch

from mm1_megatron.conversion.errors import ConversionError, shape_mismatch
from mm1_megatron.conversion.mapping import AttentionShape, Unit, combine, separate
from mm1_megatron.conversion.safetensors_io import SafetensorsFolder
from mm1_megatron.conversion.vocab import grow_rows
from mm1_megatron.utils.progress import ProgressLine

logger = logging.getLogger(__name__)


def _expected_hf_shapes(
    rule, target: torch.Tensor, shape: AttentionShape, source_rows: Optional[int]
) -> Dict[str, tuple]:
    reference = target[:source_rows] if source_rows is not None else target
    return {name: tuple(t.shape) for name, t in separate(rule, reference, shape).items()}


def fill_from_hf(
    state: Dict[str, torch.Tensor],
    units: List[Unit],
    reader: SafetensorsFolder,
    shape: AttentionShape,
    *,
    label: str,
    grown: Optional[Dict[str, int]] = None,
) -> Set[str]:
    """Copy every rule's Hugging Face tensors into ``state`` (our parameters, in place).

    ``grown`` maps our names whose first dimension is larger than the source's (vocabulary
    growth) to the source row count. Returns the Hugging Face names consumed.
    """
    grown = grown or {}
    consumed: Set[str] = set()
    progress = ProgressLine(f"import {label}", total=len(units), unit="units")
    with torch.no_grad():
        for unit_name, rules in units:
            for rule in rules:
                target = state[rule.megatron]
                source_rows = grown.get(rule.megatron)
                expected = _expected_hf_shapes(rule, target, shape, source_rows)
                tensors = []
                for name in rule.hf:
                    if name not in reader:
                        raise ConversionError(
                            f"{reader.folder} lacks the tensor {name} (needed for {unit_name})"
                        )
                    got = reader.shape(name)
                    if got != expected[name]:
                        raise shape_mismatch(
                            name,
                            expected[name],
                            got,
                            expected_from=f"our {rule.megatron}",
                            got_from=str(reader.folder),
                        )
                    tensors.append(reader.get(name))
                value = combine(rule, tensors, shape)
                if source_rows is not None:
                    value = grow_rows(value, target.shape[0])
                target.copy_(value)
                consumed.update(rule.hf)
            progress.update(1, note=unit_name)
    progress.close()
    return consumed


def hf_tensors(
    source,
    units: List[Unit],
    shape: AttentionShape,
    *,
    rename: Callable[[str], str] = lambda name: name,
    dtype: torch.dtype,
    label: str,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Our tensors as Hugging Face ``(name, tensor)`` pairs, unit by unit: ``source``
    (a ``CheckpointTensors``) is read one unit at a time, so memory holds one unit."""
    progress = ProgressLine(f"export {label}", total=len(units), unit="units")
    for unit_name, rules in units:
        ours = source.fetch(rule.megatron for rule in rules)
        for rule in rules:
            for name, tensor in separate(rule, ours.pop(rule.megatron), shape).items():
                yield rename(name), tensor.to(dtype)
        progress.update(1, note=unit_name)
    progress.close()


def check_all_consumed(
    reader: SafetensorsFolder,
    consumed: Set[str],
    *,
    scope: str = "",
    ignore: Tuple[str, ...] = ("rotary_emb.inv_freq",),
) -> None:
    """Refuse a source with tensors no rule maps (they would be silently dropped)."""
    leftover = sorted(
        name
        for name in reader.keys()
        if name.startswith(scope) and name not in consumed and not name.endswith(ignore)
    )
    if leftover:
        shown = ", ".join(leftover[:5]) + (
            f" and {len(leftover) - 5} more" if len(leftover) > 5 else ""
        )
        raise ConversionError(
            f"{reader.folder} has {len(leftover)} tensors that our model has "
            f"no place for: {shown}. The architecture has parts we do not "
            f"support"
        )
