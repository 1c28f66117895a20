"""Tokenizer files for an exported folder, with the special tokens training used.

- ``data.tokenizer=huggingface``: the training tokenizer, plus the special tokens our
  wrapper appended (``<image>``, a pad token, ...) as added tokens at the same ids.
- ``data.tokenizer=synthetic``: the word-level vocabulary as a ``tokenizers`` WordLevel
  model (``PreTrainedTokenizerFast``), splitting exactly like ``SyntheticTokenizer``.
- ``data.tokenizer=sentencepiece``: the ``.model`` file is copied as ``tokenizer.model``.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from mm1_megatron.config import MM1Config
from mm1_megatron.conversion.errors import ConversionError

logger = logging.getLogger(__name__)

# The synthetic tokenizer's pieces (mm1_megatron/data/tokenizer.py): a special token, a
# run of word characters, or one punctuation character.
_SYNTHETIC_PIECE = r"<[^<>\s]+>|\w+|[^\w\s]"


@dataclass
class TokenizerSource:
    kind: str
    path: Optional[str]
    tokenizer: object  # our data-pipeline tokenizer (mm1_megatron.data)

    def special_ids(self) -> Dict[str, int]:
        t = self.tokenizer
        return {"image": t.image_token_id, "pad": t.pad_token_id, "bos": t.bos_token_id,
                "eos": t.eos_token_id}


def resolve_tokenizer(cfg: MM1Config, override: Optional[Path] = None) -> TokenizerSource:
    """The tokenizer the checkpoint was trained with (or ``override``, a HF folder)."""
    from mm1_megatron.data.text_tokenizers import build_tokenizer

    kind, path = cfg.data.tokenizer, cfg.data.tokenizer_path
    if override is not None:
        kind, path = "huggingface", str(override)
    if kind != "synthetic" and (not path or not Path(path).exists()):
        raise ConversionError(f"the checkpoint's tokenizer {path!r} (data.tokenizer={kind}) does "
                              f"not exist here; pass --tokenizer with its folder")
    return TokenizerSource(kind, path, build_tokenizer(kind, path if kind != "synthetic" else None))


def _synthetic_tokenizer_fast(tokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: index for index, piece in enumerate(tokenizer.vocabulary)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(_SYNTHETIC_PIECE), behavior="isolated")])
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=1 << 30)


def _huggingface_tokenizer(source: TokenizerSource):
    from transformers import AddedToken

    hf = source.tokenizer.hf
    added = list(source.tokenizer._added.pieces)
    if added:  # appended in the wrapper's order, so they get the wrapper's ids
        hf.add_tokens([AddedToken(piece, special=True, normalized=False) for piece in added],
                      special_tokens=True)
    special = source.special_ids()
    image_id = hf.convert_tokens_to_ids("<image>")
    if image_id != special["image"]:
        raise ConversionError(f"<image> has id {image_id} in the exported tokenizer but "
                              f"{special['image']} in training")
    for name in ("pad", "bos", "eos"):
        if getattr(hf, f"{name}_token_id") != special[name]:
            setattr(hf, f"{name}_token", hf.convert_ids_to_tokens(special[name]))
    return hf


def write_tokenizer(source: TokenizerSource, folder: Path) -> None:
    if source.kind == "synthetic":
        _synthetic_tokenizer_fast(source.tokenizer).save_pretrained(str(folder))
    elif source.kind == "huggingface":
        _huggingface_tokenizer(source).save_pretrained(str(folder))
    else:
        shutil.copy2(source.path, Path(folder) / "tokenizer.model")
        logger.warning("sentencepiece tokenizer copied as tokenizer.model; its special tokens "
                       "<image>/<pad> (ids %s) are not in it", source.special_ids())
