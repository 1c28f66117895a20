"""Subword tokenizers behind the ``Tokenizer`` protocol: sentencepiece and Hugging Face.

Both wrap an existing model and add what the pipeline needs that the model may lack:
``<image>``, a pad token distinct from every other special token, ``<bos>`` and
``<eos>``. A missing special token gets the next id after the model's vocabulary, so
``vocab_size`` grows by the number added; the model's own ids never change. ``encode``
never adds bos/eos (the pipeline adds them).

``train_sentencepiece`` trains a model whose specials have fixed ids: pad 0, unk 1,
bos 2, eos 3, ``<image>`` 4, then the default chat template's markers ``<system>``
``<user>`` ``<assistant>`` ``<end_turn>`` 5-8 (user-defined symbols, so the model knows
them and each is one token, as supervised fine-tuning needs).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

from mm1_megatron.data.tokenizers.base import SyntheticTokenizer, Tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_KINDS = ("synthetic", "sentencepiece", "huggingface")
IMAGE_TOKEN = "<image>"
TRAINED_SPECIAL_IDS = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "image": 4}
CHAT_MARKERS = ("<system>", "<user>", "<assistant>", "<end_turn>")  # ChatTemplateConfig's


class _AddedSpecials:
    """Ids past the model's vocabulary for the special tokens it lacks."""

    def __init__(self, base_vocab_size: int):
        self.base_vocab_size = base_vocab_size
        self.pieces: List[str] = []

    def add(self, piece: str) -> int:
        self.pieces.append(piece)
        return self.base_vocab_size + len(self.pieces) - 1

    def decode_with(self, ids: Sequence[int], decode_base) -> str:
        """Decode runs of model ids with ``decode_base``; added ids become their piece."""
        parts, run = [], []
        for token in (int(t) for t in ids):
            if token >= self.base_vocab_size:
                if run:
                    parts.append(decode_base(run))
                    run = []
                parts.append(self.pieces[token - self.base_vocab_size])
            else:
                run.append(token)
        if run:
            parts.append(decode_base(run))
        return "".join(parts)


class SentencePieceTokenizer:
    """A sentencepiece model (e.g. one from ``train_sentencepiece`` or a Llama-2 model)."""

    kind = "sentencepiece"

    def __init__(self, model_path: Union[str, Path]):
        import sentencepiece

        self.model_path = str(model_path)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        size = self.processor.get_piece_size()
        self._added = _AddedSpecials(size)
        image = self.processor.piece_to_id(IMAGE_TOKEN)
        known_image = image != self.processor.unk_id() and 0 <= image < size
        self.image_token_id = image if known_image else self._added.add(IMAGE_TOKEN)
        self.bos_token_id = self._existing_or_added(self.processor.bos_id(), "<s>")
        self.eos_token_id = self._existing_or_added(self.processor.eos_id(), "</s>")
        pad = self.processor.pad_id()
        taken = {self.image_token_id, self.bos_token_id, self.eos_token_id}
        self.pad_token_id = pad if pad >= 0 and pad not in taken else self._added.add("<pad>")
        self.vocab_size = size + len(self._added.pieces)

    def __getstate__(self):  # reload from the file in worker processes
        return {"model_path": self.model_path}

    def __setstate__(self, state) -> None:
        self.__init__(state["model_path"])

    def _existing_or_added(self, token_id: int, piece: str) -> int:
        return token_id if token_id >= 0 else self._added.add(piece)

    def encode(self, text: str) -> List[int]:
        return list(self.processor.encode(text, out_type=int))

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of ``piece`` when it is one entry of the model (e.g. a chat marker)."""
        token = self.processor.piece_to_id(piece)
        return token if token != self.processor.unk_id() else None

    def decode(self, ids: Sequence[int]) -> str:
        return self._added.decode_with(ids, self.processor.decode)


class HuggingFaceTokenizer:
    """A tokenizer saved with ``save_pretrained`` (a local folder; nothing is downloaded)."""

    kind = "huggingface"

    def __init__(self, path: Union[str, Path]):
        from transformers import AutoTokenizer

        self.model_path = str(path)
        self.hf = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        size = len(self.hf)
        self._added = _AddedSpecials(size)
        image = self.hf.convert_tokens_to_ids(IMAGE_TOKEN)
        known_image = image is not None and image != self.hf.unk_token_id and 0 <= image < size
        self.image_token_id = image if known_image else self._added.add(IMAGE_TOKEN)
        bos = self.hf.bos_token_id if self.hf.bos_token_id is not None else self.hf.cls_token_id
        eos = self.hf.eos_token_id if self.hf.eos_token_id is not None else self.hf.sep_token_id
        self.bos_token_id = bos if bos is not None else self._added.add("<bos>")
        self.eos_token_id = eos if eos is not None else self._added.add("<eos>")
        pad = self.hf.pad_token_id
        taken = {self.image_token_id, self.bos_token_id, self.eos_token_id}
        self.pad_token_id = (
            pad if pad is not None and pad not in taken else self._added.add("<pad>")
        )
        self.vocab_size = size + len(self._added.pieces)

    def encode(self, text: str) -> List[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def piece_id(self, piece: str) -> Optional[int]:
        """The id of ``piece`` when it is one entry of the vocabulary (e.g. a chat marker)."""
        token = self.hf.convert_tokens_to_ids(piece)
        return token if token is not None and token != self.hf.unk_token_id else None

    def decode(self, ids: Sequence[int]) -> str:
        return self._added.decode_with(ids, lambda run: self.hf.decode(run))


def build_tokenizer(kind: str, path: Optional[str] = None) -> Tokenizer:
    """``synthetic`` (no path), ``sentencepiece`` (a .model file), ``huggingface`` (a folder)."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer kind {kind!r} is not one of {TOKENIZER_KINDS}")
    if kind == "synthetic":
        if path:
            raise ValueError("the synthetic tokenizer takes no path; set data.tokenizer.path=null")
        return SyntheticTokenizer()
    if not path or not Path(path).exists():
        raise ValueError(
            f"data.tokenizer.kind={kind} needs data.tokenizer.path to name an existing "
            f"{'.model file' if kind == 'sentencepiece' else 'folder'}, got {path!r}"
        )
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    return HuggingFaceTokenizer(path)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> Dict[str, object]:
    """What must agree between a tokenized corpus and the tokenizer that reads it."""
    fingerprint: Dict[str, object] = {
        "kind": getattr(tokenizer, "kind", type(tokenizer).__name__),
        # A vocabulary that only grew at its end reads what its earlier self wrote.
        "vocab_size": getattr(tokenizer, "fingerprint_vocab_size", tokenizer.vocab_size),
        "special_ids": [
            tokenizer.pad_token_id,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.image_token_id,
        ],
    }
    model_path = getattr(tokenizer, "model_path", None)
    if model_path and Path(model_path).is_file():
        fingerprint["sha256"] = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    return fingerprint


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: Union[str, Path],
    *,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 0.9995,
) -> Path:
    """Train on ``texts`` (one sentence or document each); returns ``<prefix>.model``.

    ``vocab_size`` is an upper bound: a small corpus yields fewer pieces rather than failing.
    """
    import sentencepiece

    if vocab_size < len(TRAINED_SPECIAL_IDS) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room beyond the "
            f"{len(TRAINED_SPECIAL_IDS)} special tokens"
        )
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=(text for text in texts if text.strip()),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        hard_vocab_limit=False,
        pad_id=TRAINED_SPECIAL_IDS["pad"],
        unk_id=TRAINED_SPECIAL_IDS["unk"],
        bos_id=TRAINED_SPECIAL_IDS["bos"],
        eos_id=TRAINED_SPECIAL_IDS["eos"],
        user_defined_symbols=[IMAGE_TOKEN, *CHAT_MARKERS],
        minloglevel=2,
    )
    return Path(f"{prefix}.model")
