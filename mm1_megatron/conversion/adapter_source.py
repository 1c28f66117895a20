"""A LoRA run's checkpoint read as a whole model, for ``mm1 convert export``.

A LoRA checkpoint holds only what its run trained (``checkpoint/adapters.py``); its base is
the checkpoint ``adapter_base.json`` records (or ``--base``), checked by fingerprint.
``MergedAdapterTensors`` serves the same names as a ``CheckpointTensors`` of a plain
checkpoint: the base's tensors, each adapted weight merged (``W + alpha / r * B A``, in
float32), and the fully trained parts from the LoRA checkpoint; one unit at a time, as
every export reads.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch

from mm1_megatron.config.schema import LoRAConfig, ModelConfig, ModelPart
from mm1_megatron.conversion.checkpoint_stream import CheckpointTensors
from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)


def adapter_base_folder(step: Path, base: Optional[Path]) -> Path:
    """The base checkpoint of the LoRA checkpoint ``step``: ``base`` or the recorded one,
    its fingerprint checked."""
    from mm1_megatron.checkpoint.adapters import check_same_base, read_base_record
    from mm1_megatron.conversion import megatron_io

    record = read_base_record(step)
    if record is None:
        raise ConversionError(f"{step} holds LoRA adapters but no adapter_base.json")
    folder = Path(base) if base is not None else Path(record["initial_weights"])
    if not folder.exists():
        raise ConversionError(
            f"the base of the LoRA checkpoint {step}, {folder}, does not exist; pass its "
            "new place with --base"
        )
    try:
        check_same_base(step, str(folder))
    except ValueError as exc:
        raise ConversionError(str(exc)) from None
    return megatron_io.resolve_step_folder(folder)


class MergedAdapterTensors:
    """The TP=1 tensors of a LoRA checkpoint's model with its adapters merged."""

    def __init__(
        self,
        step: Path,
        base_step: Path,
        model: ModelConfig,
        parts: Sequence[ModelPart],
        *,
        image_token_id: int,
    ):
        from mm1_megatron.models.lora import adapted_stems, is_adapter_key

        lora = model.lora
        self.scale = lora.scale
        self._trained_prefixes = tuple(f"{part}." for part in lora.fully_trained)
        self.base = CheckpointTensors(
            base_step, replace(model, lora=LoRAConfig()), parts, image_token_id=image_token_id
        )
        self.trained = CheckpointTensors(
            step,
            model,
            parts,
            image_token_id=image_token_id,
            select=lambda name: is_adapter_key(name) or name.startswith(self._trained_prefixes),
        )
        self._adapted = {stem + "weight" for stem in adapted_stems(self.trained.names())}
        logger.info(
            "merging %d LoRA adapters (alpha / rank = %g) into %s",
            len(self._adapted),
            self.scale,
            base_step,
        )

    @property
    def largest_fetch_bytes(self) -> int:
        return self.base.largest_fetch_bytes + self.trained.largest_fetch_bytes

    def names(self, prefix: str = "") -> list:
        return self.base.names(prefix)

    def fetch(self, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        from mm1_megatron.models.lora import merged_weight

        names = list(names)
        trained = [n for n in names if n.startswith(self._trained_prefixes)]
        adapted = [n for n in names if n in self._adapted]
        stem = [n[: -len("weight")] for n in adapted]
        factors = self.trained.fetch(
            trained + [s + "lora_a" for s in stem] + [s + "lora_b" for s in stem]
        )
        tensors = self.base.fetch([n for n in names if n not in trained])
        for name, s in zip(adapted, stem):
            tensors[name] = merged_weight(
                tensors[name], factors[s + "lora_a"], factors[s + "lora_b"], self.scale
            )
        tensors.update({n: factors[n] for n in trained})
        return tensors
