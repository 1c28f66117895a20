"""Sentencepiece and Hugging Face tokenizers behind the Tokenizer protocol."""

import pickle

import pytest

from mm1_megatron.data.tokenizers.base import Tokenizer
from mm1_megatron.data.tokenizers.text import (
    TRAINED_SPECIAL_IDS,
    SentencePieceTokenizer,
    build_tokenizer,
    train_sentencepiece,
)

CORPUS = [
    "a red circle at the top left",
    "two blue squares on a white background",
    "the quick brown fox jumps over the lazy dog",
    "here is a picture of a cat",
] * 20


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(CORPUS, tmp_path_factory.mktemp("sp") / "tok", vocab_size=80)


def test_trained_sentencepiece_has_fixed_special_ids(sp_model):
    tok = build_tokenizer("sentencepiece", str(sp_model))
    assert isinstance(tok, Tokenizer)
    ids = {
        "pad": tok.pad_token_id,
        "bos": tok.bos_token_id,
        "eos": tok.eos_token_id,
        "image": tok.image_token_id,
    }
    assert ids == {k: v for k, v in TRAINED_SPECIAL_IDS.items() if k != "unk"}
    assert tok.vocab_size == tok.processor.get_piece_size() <= 80  # nothing added
    ids = tok.encode("a red circle")
    assert tok.decode(ids) == "a red circle"
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok.image_token_id in tok.encode("x <image>")  # the model knows the symbol
    # The default chat template's markers are single tokens, ids 5-8 (SFT needs that).
    from mm1_megatron.config.schema import ChatTemplateConfig
    from mm1_megatron.data.shards.conversations import template_token

    template = ChatTemplateConfig()
    markers = [template.system, template.user, template.assistant, template.end_of_turn]
    assert [template_token(tok, marker) for marker in markers] == [5, 6, 7, 8]


def test_existing_model_without_specials_gets_them_appended(tmp_path):
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=60,
        hard_vocab_limit=False,
        pad_id=-1,
        bos_id=-1,
        unk_id=0,
        eos_id=1,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer(tmp_path / "plain.model")
    size = tok.processor.get_piece_size()
    assert tok.eos_token_id == 1
    assert sorted([tok.image_token_id, tok.bos_token_id, tok.pad_token_id]) == [
        size,
        size + 1,
        size + 2,
    ]
    assert tok.vocab_size == size + 3
    ids = [tok.bos_token_id, *tok.encode("a red circle"), tok.image_token_id]
    assert tok.decode(ids) == "<s>a red circle<image>"


def test_sentencepiece_tokenizer_pickles_by_path(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("the lazy dog") == tok.encode("the lazy dog")


def test_hugging_face_tokenizer_from_a_local_folder(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", eos_token="</s>"
    ).save_pretrained(tmp_path / "hf")
    tok = build_tokenizer("huggingface", str(tmp_path / "hf"))
    size = raw.get_vocab_size()
    assert tok.eos_token_id == raw.token_to_id("</s>")
    assert {tok.image_token_id, tok.bos_token_id, tok.pad_token_id} == {size, size + 1, size + 2}
    assert tok.encode("the lazy dog") == raw.encode("the lazy dog").ids
    assert tok.decode([*tok.encode("the lazy dog"), tok.image_token_id]) == "the lazy dog<image>"


@pytest.mark.parametrize(
    "kind, path, match",
    [
        ("wordpiece", None, "not one of"),
        ("sentencepiece", None, "tokenizer.path"),
        ("sentencepiece", "/no/such.model", "tokenizer.path"),
        ("synthetic", "x", "no path"),
    ],
)
def test_bad_tokenizer_settings(kind, path, match):
    with pytest.raises(ValueError, match=match):
        build_tokenizer(kind, path)
