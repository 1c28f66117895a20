"""data.* validation: every new field, with the dotted name in the message."""

import pytest

from tests.conftest import make_tiny_config

WDS = ["data.source=webdataset", "data.caption_shards=[c]", "data.interleaved_shards=[i]",
       "data.text_prefixes=[t]"]


def _errors(*overrides):
    with pytest.raises(ValueError) as info:
        make_tiny_config(*overrides)
    return str(info.value)


def test_webdataset_config_with_every_source_is_valid():
    cfg = make_tiny_config(*WDS, "data.tokenizer=sentencepiece", "data.tokenizer_path=t.model",
                           "data.image_decoder=dali", "data.image_resize=pad",
                           "data.image_dtype=bf16", "data.num_workers=2",
                           "data.prefetch_factor=4")
    assert cfg.data.caption_shards == ["c"] and cfg.data.text_prefixes == ["t"]


@pytest.mark.parametrize("overrides, fields", [
    (["data.source=parquet"], ["data.source"]),
    (["data.tokenizer=bpe"], ["data.tokenizer"]),
    (["data.tokenizer=sentencepiece"], ["data.tokenizer_path"]),
    (["data.tokenizer_path=x.model"], ["data.tokenizer_path"]),
    (["data.image_decoder=opencv"], ["data.image_decoder"]),
    (["data.image_resize=stretch"], ["data.image_resize"]),
    (["data.image_dtype=fp16"], ["data.image_dtype"]),
    (["data.prefetch_factor=0"], ["data.prefetch_factor"]),
    (["data.source=webdataset"], ["data.caption_shards", "data.interleaved_shards",
                                  "data.text_prefixes"]),
    (["data.caption_shards=[c]"], ["data.caption_shards", "data.source=webdataset"]),
])
def test_bad_data_fields_are_named(overrides, fields):
    message = _errors(*overrides)
    for field in fields:
        assert field in message, (field, message)


def test_unweighted_source_needs_no_paths_and_may_keep_them():
    cfg = make_tiny_config("data.source=webdataset", "data.mixture={caption: 1.0}",
                           "data.caption_shards=[c]")
    assert cfg.data.interleaved_shards == []
    make_tiny_config(*WDS, "data.mixture={caption: 1.0, text: 0.0}")  # an ablation
