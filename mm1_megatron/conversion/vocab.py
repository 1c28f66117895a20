"""Vocabulary growth for the special tokens MM1 training adds (``<image>``, a pad token).

Our tokenizer wrappers (``mm1_megatron.data.tokenizers.text``) give each special token a
model lacks the next id after the model's vocabulary. An import therefore sizes the
embedding and output layer to fit the tokenizer (optionally rounded up to a multiple, so
that the vocabulary divides by the tensor-parallel size), and initialises every new row
to the **mean of the source rows** of that matrix: a new token then starts as the
average token, with an average logit, instead of a random direction. The source rows are
copied unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class VocabularyPlan:
    source_size: int
    target_size: int
    tokenizer_path: Optional[str] = None
    special_ids: Dict[str, int] = field(default_factory=dict)
    added_tokens: List[str] = field(default_factory=list)

    @property
    def num_new_rows(self) -> int:
        return self.target_size - self.source_size


def has_tokenizer_files(folder) -> bool:
    folder = Path(folder)
    return any(
        (folder / name).is_file()
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_vocabulary(
    source_size: int, *, tokenizer_path=None, vocab_size: Optional[int] = None, multiple: int = 1
) -> VocabularyPlan:
    """The imported vocabulary: the source's, grown to fit the tokenizer's added specials,
    then to ``vocab_size`` if given, then rounded up to ``multiple``."""
    if multiple < 1:
        raise ConversionError(f"--vocab-multiple must be >= 1, got {multiple}")
    plan = VocabularyPlan(source_size=source_size, target_size=source_size)
    if tokenizer_path is not None:
        from mm1_megatron.data.tokenizers.text import HuggingFaceTokenizer

        tokenizer = HuggingFaceTokenizer(tokenizer_path)
        plan.tokenizer_path = str(Path(tokenizer_path).resolve())
        plan.special_ids = {
            "image": tokenizer.image_token_id,
            "pad": tokenizer.pad_token_id,
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
        }
        plan.added_tokens = list(tokenizer._added.pieces)
        plan.target_size = max(plan.target_size, tokenizer.vocab_size)
    if vocab_size is not None:
        if vocab_size < plan.target_size:
            raise ConversionError(
                f"--vocab-size {vocab_size} is smaller than the "
                f"{plan.target_size} tokens the model and tokenizer need"
            )
        plan.target_size = vocab_size
    plan.target_size = _round_up(plan.target_size, multiple)
    if plan.num_new_rows:
        logger.info(
            "vocabulary grows from %d to %d rows (added tokens: %s); new rows start "
            "at the mean of the source rows",
            source_size,
            plan.target_size,
            plan.added_tokens or "none",
        )
    return plan


def grow_rows(source: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[v, h]`` -> ``[num_rows, h]``: the source rows, then copies of their mean."""
    if num_rows == source.shape[0]:
        return source
    mean = source.double().mean(dim=0).to(source.dtype)
    extra = mean.expand(num_rows - source.shape[0], -1)
    return torch.cat([source, extra], dim=0)
