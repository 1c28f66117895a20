"""Shard and text-index builders: content equals the inputs; interrupted builds resume.
``mm1 data`` (``shards``, ``tokenizer``, ``text-index``) builds the same from the command
line, with the flag spellings of every verb."""

import json
import logging
from pathlib import Path

import pytest

from mm1_megatron.data import cli
from mm1_megatron.data.shards.ingest import (
    coco_items,
    interleaved_items,
    jsonl_texts,
    llava_items,
    load_url_map,
)
from mm1_megatron.data.shards.reader import ShardReader, load_manifest
from mm1_megatron.data.shards.records import ImageRef, parse_segments
from mm1_megatron.data.shards.text_index import build_text_index
from mm1_megatron.data.shards.writer import build_shards
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from tests.data.corpus_fixtures import make_coco, make_interleaved, make_llava, make_text_jsonl

TOK = SyntheticTokenizer()


def read_corpus(manifest_dir):
    """Every sample in manifest order: segments with images replaced by their bytes."""
    manifest, reader, samples = load_manifest(manifest_dir), ShardReader(), []
    for path, size in zip(manifest.shard_paths, manifest.shard_sizes):
        index = reader.index(path)
        assert len(index.samples) == size
        for sample in index.samples:
            members = sample.members
            segments = parse_segments(
                {e: s for e, (_, s) in members.items()},
                lambda e, path=path, members=members: reader.read(path, members[e]),
            )
            samples.append(
                [
                    reader.read(path, members[s.extension]) if isinstance(s, ImageRef) else s
                    for s in segments
                ]
            )
    return samples


def test_coco_first_caption_per_image(tmp_path):
    captions, images = make_coco(tmp_path / "in", 7)
    counts = build_shards(
        coco_items(captions, images),
        tmp_path / "out",
        kind="caption",
        samples_per_shard=3,
        input_id="t",
        progress=False,
    )
    assert counts == {"written": 7, "shards": 3}
    data = json.loads(captions.read_text())
    expected = []
    for image in sorted(data["images"], key=lambda i: i["id"]):
        first = min(
            (a for a in data["annotations"] if a["image_id"] == image["id"]), key=lambda a: a["id"]
        )
        expected.append([(images / image["file_name"]).read_bytes(), first["caption"]])
    assert read_corpus(tmp_path / "out") == expected


def test_coco_all_captions_and_missing_images(tmp_path):
    captions, images = make_coco(tmp_path / "in", 4)
    next(images.glob("*.png")).unlink()
    counts = build_shards(
        coco_items(captions, images, all_captions=True),
        tmp_path / "out",
        kind="caption",
        samples_per_shard=10,
        input_id="t",
        progress=False,
    )
    assert counts == {"written": 6, "missing_image": 2, "shards": 1}
    assert all(len(sample) == 2 for sample in read_corpus(tmp_path / "out"))


def test_llava_caption_is_the_first_gpt_turn(tmp_path):
    json_path, images = make_llava(tmp_path / "in", 5)
    build_shards(
        llava_items(json_path, images),
        tmp_path / "out",
        kind="caption",
        samples_per_shard=2,
        input_id="t",
        progress=False,
    )
    entries = json.loads(json_path.read_text())
    assert read_corpus(tmp_path / "out") == [
        [(images / e["image"]).read_bytes(), e["conversations"][1]["value"]] for e in entries
    ]


@pytest.mark.parametrize("obelics_style", [False, True])
def test_interleaved_documents_keep_order_and_resolve_urls(tmp_path, obelics_style):
    jsonl, images, tsv = make_interleaved(tmp_path / "in", 4)
    if obelics_style:  # the same documents as parallel texts/images lists
        docs = [json.loads(line) for line in jsonl.read_text().splitlines()]
        jsonl.write_text(
            "".join(
                json.dumps(
                    {
                        "texts": [s.get("text") for s in d["segments"]],
                        "images": [s.get("image") for s in d["segments"]],
                    }
                )
                + "\n"
                for d in docs
            )
        )
    build_shards(
        interleaved_items([jsonl], images, url_map=load_url_map(tsv)),
        tmp_path / "out",
        kind="interleaved",
        samples_per_shard=3,
        input_id="t",
        progress=False,
    )
    urls = load_url_map(tsv)
    expected = []
    for line in jsonl.read_text().splitlines():
        doc = json.loads(line)
        pairs = (
            doc["segments"]
            if "segments" in doc
            else [{"image": i} if i else {"text": t} for t, i in zip(doc["texts"], doc["images"])]
        )
        expected.append(
            [
                s["text"]
                if "text" in s
                else (
                    urls[s["image"]] if s["image"].startswith("http") else images / s["image"]
                ).read_bytes()
                for s in pairs
            ]
        )
    assert read_corpus(tmp_path / "out") == expected


class _Interrupted(Exception):
    pass


def _interrupt_after(items, count):
    for position, item in enumerate(items):
        if position == count:
            raise _Interrupted
        yield item


def test_interrupted_shard_build_resumes_to_identical_shards(tmp_path):
    captions, images = make_coco(tmp_path / "in", 11)
    options = dict(kind="caption", samples_per_shard=3, input_id="t", progress=False)
    build_shards(coco_items(captions, images), tmp_path / "straight", **options)
    with pytest.raises(_Interrupted):
        build_shards(
            _interrupt_after(coco_items(captions, images), 8), tmp_path / "resumed", **options
        )
    assert len(load_manifest(tmp_path / "resumed").shard_paths) == 2  # 6 items, 2 shards done
    assert list((tmp_path / "resumed").glob("*.partial"))  # the unfinished third shard
    counts = build_shards(coco_items(captions, images), tmp_path / "resumed", **options)
    assert counts["written"] == 5  # items 6..10
    straight = sorted((tmp_path / "straight").glob("*.tar"))
    resumed = sorted((tmp_path / "resumed").glob("*.tar"))
    assert [p.name for p in straight] == [p.name for p in resumed]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(straight, resumed))
    assert not list((tmp_path / "resumed").glob("*.partial"))
    with pytest.raises(ValueError, match="other inputs"):
        build_shards(
            coco_items(captions, images), tmp_path / "resumed", **{**options, "input_id": "other"}
        )


def _read_index(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_text_index_holds_bos_text_eos_and_resumes(tmp_path):
    jsonl = make_text_jsonl(tmp_path, 23)
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    expected = [[TOK.bos_token_id, *TOK.encode(t), TOK.eos_token_id] for t in texts]
    counts = build_text_index(
        jsonl_texts([jsonl]), tmp_path / "a", TOK, docs_per_part=5, progress=False
    )
    assert counts["documents"] == 23 and counts["tokens"] == sum(map(len, expected))
    assert _read_index(tmp_path / "a") == expected
    with pytest.raises(_Interrupted):
        build_text_index(
            _interrupt_after(jsonl_texts([jsonl]), 12),
            tmp_path / "b",
            TOK,
            docs_per_part=5,
            progress=False,
        )
    assert len(list(Path(f"{tmp_path / 'b'}.parts").glob("part-*.idx"))) == 2
    encoded = []

    class Counting(SyntheticTokenizer):
        def encode(self, text):
            encoded.append(text)
            return super().encode(text)

    build_text_index(
        jsonl_texts([jsonl]), tmp_path / "b", Counting(), docs_per_part=5, progress=False
    )
    assert encoded == texts[10:]  # the two finished parts were not tokenized again
    assert _read_index(tmp_path / "b") == expected


def test_jsonl_texts_skips_undecodable_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(
        b'{"text": "one"}\n\xff\xfe\n{"text": "two"}\n[1]\n{"segments": '
        b'[{"text": "a"}, {"image": "x"}, {"text": "b"}]}\n'
    )
    from collections import Counter

    counts = Counter()
    assert list(jsonl_texts([path], counts=counts)) == ["one", "two", "a b"]
    assert counts == {"bad_text": 1, "bad_record": 1}


# ---- mm1 data ---------------------------------------------------------------------------
@pytest.fixture
def data_cli(monkeypatch, caplog):
    """``main`` with pytest's log capture kept (it reconfigures logging for a terminal)."""
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    caplog.set_level(logging.INFO)
    return cli.main


def test_shards_command_writes_what_the_library_writes(tmp_path, data_cli):
    captions, images = make_coco(tmp_path / "in", 5)
    build_shards(
        coco_items(captions, images),
        tmp_path / "library",
        kind="caption",
        samples_per_shard=2,
        input_id="t",
        progress=False,
    )
    code = data_cli(
        ["shards", "coco", str(captions), "--images", str(images),
         "--output", str(tmp_path / "cli"), "--samples-per-shard", "2", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert read_corpus(tmp_path / "cli") == read_corpus(tmp_path / "library")
    assert (tmp_path / "cli" / ".nv-meta").is_dir()  # the energon sidecar, by default


def test_shards_from_llava_and_several_interleaved_files(tmp_path, data_cli):
    json_path, images = make_llava(tmp_path / "llava", 3)
    code = data_cli(
        ["shards", "llava", str(json_path), "--images", str(images),
         "--output", str(tmp_path / "llava_shards"), "--no-progress", "--no-energon-meta"]
    )  # fmt: skip
    assert code == 0 and len(read_corpus(tmp_path / "llava_shards")) == 3
    assert not (tmp_path / "llava_shards" / ".nv-meta").exists()
    first, doc_images, tsv = make_interleaved(tmp_path / "docs_in", 2)
    second = first.with_name("more.jsonl")  # a second file: the same documents again
    second.write_text(first.read_text())
    code = data_cli(
        ["shards", "interleaved", str(first), str(second),
         "--images", str(doc_images), "--url-map", str(tsv), "--output",
         str(tmp_path / "docs"), "--no-progress"]
    )  # fmt: skip
    assert code == 0
    documents = read_corpus(tmp_path / "docs")
    assert len(documents) == 4 and documents[:2] == documents[2:]


def test_tokenizer_then_text_index(tmp_path, data_cli):
    from mm1_megatron.data.tokenizers.text import SentencePieceTokenizer

    text = make_text_jsonl(tmp_path / "in", 60)
    plain = tmp_path / "in" / "captions.txt"
    plain.write_text("a red circle .\na blue square .\n")
    prefix = tmp_path / "tok" / "sp"
    code = data_cli(
        ["tokenizer", str(text), str(plain), "--vocab-size", "120",
         "--output", str(prefix)]
    )  # fmt: skip
    assert code == 0 and Path(f"{prefix}.model").is_file()
    tokenizer = SentencePieceTokenizer(f"{prefix}.model")
    assert tokenizer.vocab_size == 120 and tokenizer.image_token_id == 4
    code = data_cli(
        ["text-index", str(text), "--tokenizer-path", f"{prefix}.model",
         "--output", str(tmp_path / "corpus"), "--docs-per-part", "25", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    texts = [json.loads(line)["text"] for line in text.read_text().splitlines()]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert _read_index(tmp_path / "corpus") == [[bos, *tokenizer.encode(t), eos] for t in texts]


def test_the_old_out_spelling_warns_and_still_works(tmp_path, data_cli, caplog):
    captions, images = make_coco(tmp_path / "in", 2)
    code = data_cli(
        ["shards", "coco", str(captions), "--images", str(images),
         "--out", str(tmp_path / "old"), "--no-progress"]
    )  # fmt: skip
    assert code == 0 and len(read_corpus(tmp_path / "old")) == 2
    assert "mm1 data shards coco: --out is deprecated" in caplog.text
    assert "use --output" in caplog.text


def test_missing_output_and_bad_inputs_exit_2(tmp_path, data_cli, caplog, capsys):
    with pytest.raises(SystemExit) as exit_info:
        data_cli(["tokenizer", "corpus.jsonl"])
    assert exit_info.value.code == 2
    assert "mm1 data tokenizer: error: the following arguments are required: --output" in (
        capsys.readouterr().err
    )
    code = data_cli(
        ["shards", "llava", str(tmp_path / "missing.json"), "--images",
         str(tmp_path), "--output", str(tmp_path / "out")]
    )  # fmt: skip
    assert code == 2 and "missing.json" in caplog.text
