"""Sample schema, tar scanning and manifests: what a shard means, byte for byte."""

import gzip
import io
import json
import tarfile

import pytest

from mm1_megatron.data.shards.reader import (
    ShardReader,
    check_plain_tar,
    index_existing_shards,
    load_manifest,
    scan_shard,
    split_member_name,
    write_manifest,
)
from mm1_megatron.data.shards.records import (
    ImageRef,
    parse_segments,
    record_members,
    tokenize_segments,
)
from mm1_megatron.data.shards.skips import BadSample
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.data.corpus_fixtures import write_tar

TOK = SyntheticTokenizer()


def _parse(members):
    return parse_segments(
        {ext: len(data) for ext, data in members.items()}, lambda ext: members[ext]
    )


@pytest.mark.parametrize(
    "name, key, extension",
    [
        ("000017.jpg", "000017", "jpg"),
        ("a/b/000017.0.JPG", "a/b/000017", "0.jpg"),
        ("../up/x.txt", "../up/x", "txt"),
        ("noext", "noext", ""),
    ],
)
def test_member_names_split_into_key_and_extension(name, key, extension):
    assert split_member_name(name) == (key, extension)


def test_json_record_gives_segment_order():
    members = record_members(["first :", (b"IMG0", "png"), "then", (b"IMG1", "jpg"), "end"])
    assert set(members) == {"0.png", "1.jpg", "json"}
    assert json.loads(members["json"]) == {
        "segments": [
            {"text": "first :"},
            {"image": "0.png"},
            {"text": "then"},
            {"image": "1.jpg"},
            {"text": "end"},
        ]
    }
    assert _parse(members) == ["first :", ImageRef("0.png"), "then", ImageRef("1.jpg"), "end"]


def test_txt_caption_pair_and_img2dataset_metadata():
    pair = {"jpg": b"IMG", "txt": b"a red circle"}
    assert _parse(pair) == [ImageRef("jpg"), "a red circle"]
    with_metadata = {**pair, "json": json.dumps({"url": "http://x", "width": 3}).encode()}
    assert _parse(with_metadata) == [ImageRef("jpg"), "a red circle"]


@pytest.mark.parametrize(
    "members, reason",
    [
        ({"json": json.dumps({"segments": [{"image": "0.jpg"}]}).encode()}, "missing_image"),
        (
            {"0.jpg": b"", "json": json.dumps({"segments": [{"image": "0.jpg"}]}).encode()},
            "empty_file",
        ),
        ({"jpg": b"IMG", "txt": b""}, "empty_file"),
        ({"jpg": b"IMG", "txt": b"\xc3\x28"}, "bad_text"),
        ({"json": b"{not json"}, "bad_text"),
        ({"json": json.dumps({"segments": []}).encode()}, "bad_record"),
        ({"json": json.dumps({"segments": [{"text": 3}]}).encode()}, "bad_record"),
        ({"json": json.dumps(["a list"]).encode()}, "bad_record"),
        ({"txt": b"caption without image"}, "missing_image"),
        ({"jpg": b"A", "png": b"B", "txt": b"two images"}, "bad_record"),
        ({"cls": b"3"}, "bad_record"),
    ],
)
def test_bad_samples_raise_with_their_reason(members, reason):
    with pytest.raises(BadSample) as info:
        _parse(members)
    assert info.value.reason == reason


def test_tokenized_form_and_literal_special_tokens_in_text():
    segments = ["here is a picture :", ImageRef("0.jpg"), "it shows <image> <pad> a red circle"]
    tokenized = tokenize_segments(segments, TOK)
    expected = (
        [TOK.bos_token_id]
        + TOK.encode("here is a picture :")
        + [TOK.image_token_id]
        + TOK.encode("it shows a red circle")
        + [TOK.eos_token_id]
    )
    assert tokenized.token_ids == expected
    assert tokenized.image_members == ["0.jpg"]


def test_unknown_words_are_bad_text_for_the_synthetic_tokenizer():
    with pytest.raises(BadSample) as info:
        tokenize_segments(["a zebra"], TOK)
    assert info.value.reason == "bad_text"


def test_scan_groups_members_and_reads_exact_bytes(tmp_path):
    samples = [("k0", {"jpg": b"A" * 700, "txt": b"one"}), ("k1", {"json": b"{}", "0.png": b"B"})]
    write_tar(tmp_path / "s.tar", samples)
    index = scan_shard(tmp_path / "s.tar")
    assert [s.key for s in index.samples] == ["k0", "k1"] and not index.truncated
    reader = ShardReader()
    for (_, members), sample in zip(samples, index.samples):
        assert set(sample.members) == set(members)
        for ext, data in members.items():
            assert reader.read(str(tmp_path / "s.tar"), sample.members[ext]) == data
    reader.close()


def test_directories_and_links_are_ignored(tmp_path):
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as archive:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        link = tarfile.TarInfo("k0.lnk")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(link)
        info = tarfile.TarInfo("k0.txt")
        info.size = 2
        archive.addfile(info, io.BytesIO(b"hi"))
    (sample,) = scan_shard(path).samples
    assert sample.key == "k0" and set(sample.members) == {"txt"}


def test_truncated_tar_keeps_whole_samples_and_flags_the_cut_one(tmp_path):
    path = tmp_path / "s.tar"
    write_tar(path, [(f"k{i}", {"txt": bytes([65 + i]) * 1000}) for i in range(4)])
    offset, size = scan_shard(path).samples[2].members["txt"]
    with open(path, "r+b") as file:
        file.truncate(offset + 10)
    index = scan_shard(path)
    assert index.truncated
    assert [s.key for s in index.samples[:2]] == ["k0", "k1"]
    assert index.samples[2].truncated and "txt" not in index.samples[2].members
    with pytest.raises(BadSample, match="past the"):
        ShardReader().sample(str(path), 3)


def _four_samples(tmp_path):
    path = tmp_path / "s.tar"
    write_tar(path, [(f"k{i}", {"txt": bytes([65 + i]) * 1000}) for i in range(4)])
    offset = scan_shard(path).samples[3].members["txt"][0]
    return path, offset  # the last sample's data; its header is the 512 bytes before


@pytest.mark.parametrize(
    "where, readable, expected",
    [
        ("inside_data", 4, "file ends inside sample 'k3' (its member 'k3.txt' lacks 990 of"),
        ("inside_header", 3, "its last 100 bytes (from byte {header}) are not a readable tar"),
        ("at_boundary", 3, "without tar's end-of-archive marker"),
        ("intact", 4, None),
    ],
)
def test_indexing_a_damaged_shard_warns_with_what_was_lost(
    tmp_path, caplog, where, readable, expected
):
    path, offset = _four_samples(tmp_path)
    header = offset - 512
    cut = {"inside_data": offset + 10, "inside_header": header + 100, "at_boundary": header}
    if where in cut:
        with open(path, "r+b") as file:
            file.truncate(cut[where])
    with caplog.at_level("WARNING", logger="mm1_megatron.data.shards.reader"):
        manifest = index_existing_shards([path], tmp_path, "caption")
    assert load_manifest(manifest).shard_sizes == [readable]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if expected is None:
        assert warnings == []
        return
    assert str(path) in warnings[0] and expected.format(header=header) in warnings[0]
    assert f"{readable} samples readable" in warnings[0]
    assert warnings[-1] == "1 of 1 shards are damaged (warnings above)"


def test_index_command_warns_about_a_truncated_shard(tmp_path, monkeypatch, caplog):
    from mm1_megatron.data import cli

    monkeypatch.setattr(cli, "setup_logging", lambda: None)  # keep pytest's log capture
    path, offset = _four_samples(tmp_path)
    with open(path, "r+b") as file:
        file.truncate(offset - 512 + 100)  # the probe: the last sample's header cut
    manifest = tmp_path / "manifest.json"
    with caplog.at_level("WARNING"):
        code = cli.main(
            ["shards", "index", "--kind", "caption", "--output", str(manifest), str(path)]
        )
    assert code == 0 and manifest.is_file()
    assert f"shard {path} is damaged" in caplog.text and "3 samples readable" in caplog.text


def test_the_reader_warns_once_per_damaged_shard(tmp_path, caplog):
    path, offset = _four_samples(tmp_path)
    with open(path, "r+b") as file:
        file.truncate(offset + 10)
    reader = ShardReader(max_open=1)
    with caplog.at_level("WARNING", logger="mm1_megatron.data.shards.reader"):
        for _ in range(3):  # reopened each time: the other shard evicts it
            reader.index(str(path))
            write_tar(tmp_path / "other.tar", [("x", {"txt": b"x"})])
            reader.index(str(tmp_path / "other.tar"))
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == 1
    reader.close()


def test_garbage_file_is_an_empty_truncated_shard(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"\x01" * 1000)
    index = scan_shard(tmp_path / "x.tar")
    assert index.samples == [] and index.truncated


def test_compressed_shards_are_refused(tmp_path):
    write_tar(tmp_path / "s.tar", [("k", {"txt": b"x"})])
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    check_plain_tar(tmp_path / "s.tar")
    with pytest.raises(ValueError, match="gzip"):
        check_plain_tar(tmp_path / "s.tar.gz")


def test_manifest_round_trip_and_kind_check(tmp_path):
    write_tar(tmp_path / "a.tar", [("k0", {"txt": b"x"}), ("k1", {"txt": b"y"})])
    path = index_existing_shards([tmp_path / "a.tar"], tmp_path, "caption")
    manifest = load_manifest(tmp_path)  # a folder means its manifest.json
    assert path.name == "manifest.json"
    assert manifest.shard_paths == [str((tmp_path / "a.tar").resolve())]
    assert manifest.shard_sizes == [2] and manifest.kind == "caption"
    with pytest.raises(ValueError, match="interleaved"):
        load_manifest(path, kind="interleaved")
    with pytest.raises(ValueError, match="shard kind"):
        write_manifest(tmp_path / "m.json", "video", [])
    with pytest.raises(ValueError, match="cannot read"):
        load_manifest(tmp_path / "missing.json")
