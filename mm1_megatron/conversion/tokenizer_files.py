"""Tokenizer files for an exported folder, with the special tokens training used.

- ``data.tokenizer.kind=huggingface``: the training tokenizer, plus the special tokens our
  wrapper appended (``<image>``, a pad token, ...) as added tokens at the same ids.
- ``data.tokenizer.kind=synthetic``: the word-level vocabulary as a ``tokenizers`` WordLevel
  model (``PreTrainedTokenizerFast``), splitting exactly like ``SyntheticTokenizer``.
- ``data.tokenizer.kind=sentencepiece``: the ``.model`` file as ``tokenizer.model`` behind
  ``BertGenerationTokenizer``, the plain sentencepiece tokenizer of ``transformers`` 5 (it
  encodes exactly as ``SentencePieceProcessor.encode``; ``LlamaTokenizer`` would convert
  the model to a ``tokenizers`` BPE, which drops unknown characters and keeps repeated
  spaces), plus the special tokens our wrapper appended, at the same ids.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from mm1_megatron.config import MM1Config
from mm1_megatron.conversion.errors import ConversionError

# The synthetic tokenizer's pieces (mm1_megatron/data/tokenizers/base.py): a special token, a
# run of word characters, or one punctuation character.
_SYNTHETIC_PIECE = r"<[^<>\s]+>|\w+|[^\w\s]"


@dataclass
class TokenizerSource:
    kind: str
    path: Optional[str]
    tokenizer: object  # our data-pipeline tokenizer (mm1_megatron.data)

    def special_ids(self) -> Dict[str, int]:
        t = self.tokenizer
        return {
            "image": t.image_token_id,
            "pad": t.pad_token_id,
            "bos": t.bos_token_id,
            "eos": t.eos_token_id,
        }


def resolve_tokenizer(cfg: MM1Config, override: Optional[Path] = None) -> TokenizerSource:
    """The tokenizer the checkpoint was trained with (or ``override``, a HF folder)."""
    from mm1_megatron.data.tokenizers.text import build_tokenizer

    kind, path = cfg.data.tokenizer.kind, cfg.data.tokenizer.path
    if override is not None:
        kind, path = "huggingface", str(override)
    if kind != "synthetic" and (not path or not Path(path).exists()):
        raise ConversionError(
            f"the checkpoint's tokenizer {path!r} (data.tokenizer.kind={kind}) does "
            f"not exist here; pass --tokenizer with its folder"
        )
    return TokenizerSource(kind, path, build_tokenizer(kind, path if kind != "synthetic" else None))


def _synthetic_tokenizer_fast(tokenizer):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: index for index, piece in enumerate(tokenizer.vocabulary)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(_SYNTHETIC_PIECE), behavior="isolated"),
        ]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=1 << 30,
    )


def _with_training_specials(hf, source: TokenizerSource):
    """``hf`` plus the special tokens our wrapper appended (in its order, so at its ids),
    with bos / eos / pad pointing where training put them."""
    from transformers import AddedToken

    added = list(source.tokenizer._added.pieces)
    if added:
        hf.add_tokens(
            [AddedToken(piece, special=True, normalized=False) for piece in added],
            special_tokens=True,
        )
    special = source.special_ids()
    image_id = hf.convert_tokens_to_ids("<image>")
    if image_id != special["image"]:
        raise ConversionError(
            f"<image> has id {image_id} in the exported tokenizer but "
            f"{special['image']} in training"
        )
    for name in ("pad", "bos", "eos"):
        if getattr(hf, f"{name}_token_id") != special[name]:
            setattr(hf, f"{name}_token", hf.convert_ids_to_tokens(special[name]))
    return hf


def _sentencepiece_tokenizer(source: TokenizerSource, folder: Path):
    from transformers import BertGenerationTokenizer

    processor = source.tokenizer.processor
    size = processor.get_piece_size()

    def own_piece(token_id: int):  # a special the model itself has, else None
        return processor.id_to_piece(token_id) if 0 <= token_id < size else None

    special = source.special_ids()
    shutil.copy2(source.path, Path(folder) / "tokenizer.model")
    hf = BertGenerationTokenizer(
        vocab_file=str(Path(folder) / "tokenizer.model"),
        unk_token=processor.id_to_piece(processor.unk_id()),
        bos_token=own_piece(special["bos"]),
        eos_token=own_piece(special["eos"]),
        pad_token=own_piece(special["pad"]),
        sep_token=None,
    )
    return _with_training_specials(hf, source)


def write_tokenizer(
    source: TokenizerSource, folder: Path, chat_template=None, special_tokens=()
) -> None:
    """The tokenizer files; with ``chat_template`` (the run's ``ChatTemplateConfig``) also
    its Jinja chat template and markers (``conversion/chat_template.py``); each of
    ``special_tokens`` (e.g. the tile separator) kept a single token at training's id."""
    if source.kind == "synthetic":
        hf = _synthetic_tokenizer_fast(source.tokenizer)
    elif source.kind == "huggingface":
        hf = _with_training_specials(source.tokenizer.hf, source)
    else:
        hf = _sentencepiece_tokenizer(source, folder)
    if chat_template is not None:
        from mm1_megatron.conversion.chat_template import add_chat_template

        add_chat_template(hf, chat_template, source.tokenizer)
    if special_tokens:
        from mm1_megatron.conversion.chat_template import add_special_tokens
        from mm1_megatron.data.shards.conversations import template_token

        add_special_tokens(hf, {t: template_token(source.tokenizer, t) for t in special_tokens})
    hf.save_pretrained(str(folder))
