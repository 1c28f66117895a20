"""data.* validation: every new field, with the dotted name in the message."""

import pytest

from tests.conftest import make_tiny_config

WDS = [
    "data.source=webdataset",
    "data.shards.caption=[c]",
    "data.shards.interleaved=[i]",
    "data.shards.text=[t]",
]


def _errors(*overrides):
    with pytest.raises(ValueError) as info:
        make_tiny_config(*overrides)
    return str(info.value)


def test_webdataset_config_with_every_source_is_valid():
    cfg = make_tiny_config(
        *WDS,
        "data.tokenizer.kind=sentencepiece",
        "data.tokenizer.path=t.model",
        "data.images.decoder=dali",
        "data.images.resize=pad",
        "data.images.dtype=bf16",
        "data.num_workers=2",
        "data.prefetch_factor=4",
    )
    assert cfg.data.shards.caption == ["c"] and cfg.data.shards.text == ["t"]


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (["data.source=parquet"], ["data.source"]),
        (["data.tokenizer.kind=bpe"], ["data.tokenizer"]),
        (["data.tokenizer.kind=sentencepiece"], ["data.tokenizer.path"]),
        (["data.tokenizer.path=x.model"], ["data.tokenizer.path"]),
        (["data.images.decoder=opencv"], ["data.images.decoder"]),
        (["data.images.resize=stretch"], ["data.images.resize"]),
        (["data.images.dtype=fp16"], ["data.images.dtype"]),
        (["data.prefetch_factor=0"], ["data.prefetch_factor"]),
        (["data.caption_window=0"], ["data.caption_window"]),
        (
            ["data.source=webdataset"],
            ["data.shards.caption", "data.shards.interleaved", "data.shards.text"],
        ),
        (["data.shards.caption=[c]"], ["data.shards.caption", "data.source=webdataset"]),
    ],
)
def test_bad_data_fields_are_named(overrides, fields):
    message = _errors(*overrides)
    for field in fields:
        assert field in message, (field, message)


def test_unweighted_source_needs_no_paths_and_may_keep_them():
    cfg = make_tiny_config(
        "data.source=webdataset", "data.mixture={caption: 1.0}", "data.shards.caption=[c]"
    )
    assert cfg.data.shards.interleaved == []
    make_tiny_config(*WDS, "data.mixture={caption: 1.0, text: 0.0}")  # an ablation


@pytest.mark.parametrize(
    "old, value, new",
    [
        ("data.tokenizer", "sentencepiece", "data.tokenizer.kind"),
        ("data.tokenizer_path", "t.model", "data.tokenizer.path"),
        ("data.image_decoder", "dali", "data.images.decoder"),
        ("data.image_resize", "pad", "data.images.resize"),
        ("data.image_dtype", "bf16", "data.images.dtype"),
        ("data.caption_shards", "[c]", "data.shards.caption"),
        ("data.interleaved_shards", "[i]", "data.shards.interleaved"),
        ("data.text_prefixes", "[t]", "data.shards.text"),
    ],
)
def test_flat_keys_of_before_the_nesting_are_refused_naming_the_new_key(old, value, new):
    message = _errors(f"{old}={value}")
    assert f"'{old}' has moved to '{new}'" in message, message


def test_moved_keys_are_refused_in_yaml_too(tmp_path):
    from mm1_megatron.config import load_config

    path = tmp_path / "old.yaml"
    path.write_text("data:\n  tokenizer: huggingface\n  tokenizer_path: tok/\n")
    with pytest.raises(ValueError, match="'data.tokenizer' has moved to 'data.tokenizer.kind'"):
        load_config(path)


def test_caption_window_is_its_own_field():
    cfg = make_tiny_config("data.caption_window=4", "data.max_images_per_sequence=2")
    assert (cfg.data.caption_window, cfg.data.max_images_per_sequence) == (4, 2)
