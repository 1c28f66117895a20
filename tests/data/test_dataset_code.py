"""Python a dataset ships (an energon ``sample_loader``) runs only when the run allows
dataset code, and only from a file inside the dataset's own ``.nv-meta``.

The datasets are written by hand (what ``energon prepare`` writes, without running it):
their code, when it runs, leaves a file behind, so a refusal can be seen to run nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from mm1_megatron.config.schema import DataConfig, ShardsConfig
from mm1_megatron.data.shards.energon import load_source_manifest
from mm1_megatron.data.shards.records import ImageRef
from tests.data.corpus_fixtures import image_bytes, write_tar

LOADER_CODE = """
from pathlib import Path

Path({ran!r}).write_text("ran")

def sample_loader(raw):
    return dict(sequence=["here is a picture :", raw["0.jpg"], raw["txt"]])

def keep(part):
    return True
"""


def make_dataset(folder: Path, marker: Path, reference="loader.py:sample_loader", **extra):
    """One interleaved sample; ``dataset.yaml`` names ``reference`` as its sample loader."""
    import numpy as np

    image, caption = image_bytes(np.random.default_rng(0))
    write_tar(folder / "part-0.tar", [("s0", {"0.jpg": image, "txt": caption.encode()})])
    meta = folder / ".nv-meta"
    meta.mkdir(parents=True)
    (meta / ".info.json").write_text(json.dumps({"shard_counts": {"part-0.tar": 1}}))
    (meta / "split.yaml").write_text(yaml.safe_dump({"split_parts": {"train": ["part-0.tar"]}}))
    dataset = {
        "sample_type": {"__module__": "megatron.energon", "__class__": "InterleavedSample"},
        "sample_loader": reference,
        **extra,
    }
    (meta / "dataset.yaml").write_text(yaml.safe_dump(dataset))
    (meta / "loader.py").write_text(LOADER_CODE.format(ran=str(marker)))
    return caption


def test_dataset_code_is_refused_by_default_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    make_dataset(tmp_path / "ds", marker)
    with pytest.raises(ValueError) as error:
        load_source_manifest(tmp_path / "ds", "interleaved")
    message = str(error.value)
    assert "data.allow_dataset_code=true" in message
    assert str((tmp_path / "ds" / ".nv-meta" / "loader.py").resolve()) in message
    assert not marker.exists()


def test_allowed_dataset_code_runs_and_reads_samples(tmp_path):
    from mm1_megatron.data.pipeline.sources import ShardCorpus

    marker = tmp_path / "ran"
    caption = make_dataset(tmp_path / "ds", marker)
    manifest = load_source_manifest(tmp_path / "ds", "interleaved", allow_dataset_code=True)
    assert marker.exists()
    corpus = ShardCorpus([manifest], seed=0, stream=0)
    shard = corpus.shard_paths[0]
    sample = corpus.reader.sample(shard, 0)
    sizes = {ext: size for ext, (_, size) in sample.members.items()}
    segments = corpus.formats[shard].segments(sizes, corpus.reader_of(shard, sample))
    assert segments == ["here is a picture :", ImageRef("0.jpg"), caption]


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink_file", "symlink_meta"])
def test_code_outside_the_dataset_folder_is_refused_even_when_allowed(tmp_path, how):
    marker, folder = tmp_path / "ran", tmp_path / "ds"
    outside = tmp_path / "evil.py"
    outside.write_text(LOADER_CODE.format(ran=str(marker)))
    reference = {
        "dotdot": "../../evil.py:sample_loader",
        "absolute": f"{outside}:sample_loader",
        "symlink_file": "link.py:sample_loader",
        "symlink_meta": "loader.py:sample_loader",
    }[how]
    make_dataset(folder, marker, reference)
    if how == "symlink_file":
        os.symlink(outside, folder / ".nv-meta" / "link.py")
    if how == "symlink_meta":  # .nv-meta itself points at another folder's
        other = tmp_path / "elsewhere"
        (folder / ".nv-meta").rename(other)
        os.symlink(other, folder / ".nv-meta")
    with pytest.raises(ValueError, match="inside"):
        load_source_manifest(folder, "interleaved", allow_dataset_code=True)
    assert not marker.exists()


def test_part_filter_code_is_gated_too(tmp_path):
    marker, folder = tmp_path / "ran", tmp_path / "ds"
    make_dataset(folder, marker, part_filter="loader.py:keep")
    (folder / ".nv-meta" / "loader.py").write_text("def sample_loader(raw):\n    return raw\n")
    spec = yaml.safe_load((folder / ".nv-meta" / "dataset.yaml").read_text())
    spec["part_filter"] = "../../evil.py:keep"
    (folder / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="no absolute path, no '..'"):
        load_source_manifest(folder, "interleaved", allow_dataset_code=True)


def test_the_config_flag_reaches_the_data(tmp_path):
    from mm1_megatron.data.build import build_data

    marker = tmp_path / "ran"
    make_dataset(tmp_path / "ds", marker)
    assert DataConfig().allow_dataset_code is False

    def build(**options):
        cfg = DataConfig(
            source="webdataset",
            shards=ShardsConfig(interleaved=[str(tmp_path / "ds")]),
            mixture={"interleaved": 1},
            **options,
        )
        options = dict(num_image_tokens=4, image_size=28, image_mean=[0.5] * 3)
        return build_data(
            cfg,
            seq_length=64,
            micro_batch_size=1,
            image_std=[0.25] * 3,
            seed=0,
            dp_rank=0,
            dp_size=1,
            **options,
        )

    with pytest.raises(ValueError, match="data.allow_dataset_code"):
        build()
    assert not marker.exists()
    loader, _ = build(allow_dataset_code=True)
    assert int(next(loader)["num_images"][0]) == 1
