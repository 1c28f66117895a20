"""Exported sentencepiece tokenizers encode exactly as training did, special tokens
(those in the model and those our wrapper appended) at the training ids."""

from __future__ import annotations

import pytest

from tests.data.test_text_tokenizers import CORPUS

TEXTS = [
    "a red circle",
    " two  blue squares<image> x",
    "Hello world!",
    "the <image>cat",
    "zebra QUICK",
    "here is a picture of a cat <image><image>",
]


def _trained(folder):
    from mm1_megatron.data.tokenizers.text import train_sentencepiece

    return train_sentencepiece(CORPUS, folder / "tok", vocab_size=80)


def _plain(folder):
    """A model without <image>, bos or pad (our wrapper appends them)."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(folder / "plain"),
        vocab_size=60,
        hard_vocab_limit=False,
        pad_id=-1,
        bos_id=-1,
        unk_id=0,
        eos_id=1,
        minloglevel=2,
    )
    return folder / "plain.model"


@pytest.mark.parametrize("make_model", [_trained, _plain], ids=["trained", "plain"])
def test_sentencepiece_export_encodes_like_training(make_model, tmp_path):
    from transformers import AutoTokenizer

    from mm1_megatron.conversion.tokenizer_files import TokenizerSource, write_tokenizer
    from mm1_megatron.data.tokenizers.text import SentencePieceTokenizer

    model_path = make_model(tmp_path)
    ours = SentencePieceTokenizer(model_path)
    exported = tmp_path / "exported"
    exported.mkdir()
    write_tokenizer(TokenizerSource("sentencepiece", str(model_path), ours), exported)

    hf = AutoTokenizer.from_pretrained(str(exported))
    assert len(hf) == ours.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        ours.bos_token_id,
        ours.eos_token_id,
        ours.pad_token_id,
    )
    assert hf.convert_tokens_to_ids("<image>") == ours.image_token_id
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == _with_added(ours, text), text


def _with_added(ours, text):
    """Our ids for ``text``. A model that has <image> (a user-defined symbol) encodes it
    itself; an appended <image> is spliced in by our data pipeline and never reaches
    sentencepiece, so the text around it is encoded piece by piece."""
    if ours.image_token_id < ours.processor.get_piece_size():
        return ours.encode(text)
    ids = []
    for index, piece in enumerate(text.split("<image>")):
        if index:
            ids.append(ours.image_token_id)
        if piece:
            ids += ours.encode(piece)
    return ids
