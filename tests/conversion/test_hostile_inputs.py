"""``mm1-convert`` never deletes its inputs, and refuses damaged inputs and unwritable
outputs with exit code 2 and the file named, before any model is built."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil

import pytest

from mm1_megatron.conversion.cli import main
from mm1_megatron.conversion.output_folder import MARKER
from tests.conversion.hf_sources import make_word_tokenizer


@pytest.fixture(autouse=True)
def _keep_pytest_logging(monkeypatch, caplog):
    """``main`` reconfigures the root logger for a terminal; keep pytest's capture instead."""
    monkeypatch.setattr("mm1_megatron.conversion.cli.setup_logging", lambda: None)
    caplog.set_level(logging.INFO, logger="mm1_megatron")


class _Collecting(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _run(capsys, *argv) -> tuple:
    """Exit code and what the user sees (log messages and stderr)."""
    handler = _Collecting()
    logging.getLogger("mm1_megatron").addHandler(handler)
    try:
        code = main([str(arg) for arg in argv])
    finally:
        logging.getLogger("mm1_megatron").removeHandler(handler)
    return code, "\n".join(handler.messages) + "\n" + capsys.readouterr().err


def _snapshot(folder) -> dict:
    """Every file and link under ``folder`` -> a digest of its content (or its target)."""
    result = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            result[key] = "-> " + os.readlink(path)
        elif path.is_file():
            result[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _never(what: str):
    def call(*args, **kwargs):
        raise AssertionError(f"{what} before the inputs and the output were checked")

    return call


@pytest.fixture(scope="module")
def vision_run(sources, tmp_path_factory, megatron_single_process):
    """``run/ckpt`` (an imported CLIP tower, the smallest checkpoint) and ``run/tensorboard``."""
    from mm1_megatron.conversion import ImportRequest, import_checkpoint

    run = tmp_path_factory.mktemp("hostile") / "run"
    import_checkpoint(ImportRequest(output=run / "ckpt", vision_encoder=sources["clip_vision"][1]))
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_text("training curves")
    return run


@pytest.fixture
def run(vision_run, tmp_path):
    """A private copy of ``vision_run`` (a broken converter may delete it)."""
    return shutil.copytree(vision_run, tmp_path / "run")


@pytest.mark.parametrize(
    "output, relation",
    [
        ("run/ckpt", "is"),
        ("run", "contains"),  # the careless `--checkpoint runs/x/ckpt --output runs/x`
        ("run/ckpt/hf", "lies inside"),
        ("link_to_run", "contains"),
    ],
)
def test_export_never_writes_over_its_checkpoint(output, relation, run, tmp_path, capsys):
    (tmp_path / "link_to_run").symlink_to(run)
    before = _snapshot(run)
    code, err = _run(
        capsys, "export", "--checkpoint", run / "ckpt", "--output", tmp_path / output, "--overwrite"
    )
    assert code == 2, err
    assert f"--output {tmp_path / output} {relation} the input {run / 'ckpt'}" in err
    assert _snapshot(run) == before  # the checkpoint and the sibling tensorboard/ survive


@pytest.mark.parametrize(
    "output, named",
    [
        ("a", "a/llama"),
        ("b", "b/clip"),
        ("b/clip", "b/clip"),
        ("c/tokenizer/sub", "c/tokenizer"),
    ],
)
def test_import_never_writes_over_its_sources(output, named, sources, tmp_path, capsys):
    shutil.copytree(sources["llama"][1], tmp_path / "a" / "llama")
    shutil.copytree(sources["clip_vision"][1], tmp_path / "b" / "clip")
    make_word_tokenizer(tmp_path / "c" / "tokenizer")
    before = _snapshot(tmp_path)
    code, err = _run(
        capsys,
        "import",
        *(
            "--language-model",
            tmp_path / "a" / "llama",
            "--vision-encoder",
            tmp_path / "b" / "clip",
        ),
        *("--tokenizer", tmp_path / "c" / "tokenizer", "--output", tmp_path / output),
        "--overwrite",
    )
    assert code == 2, err
    assert f"--output {tmp_path / output}" in err and f"the input {tmp_path / named}" in err
    assert _snapshot(tmp_path) == before


def test_overwrite_replaces_only_what_an_earlier_conversion_wrote(run, tmp_path, capsys):
    export = ["export", "--checkpoint", run / "ckpt", "--output", tmp_path / "hf"]
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    code, err = _run(capsys, *export, "--overwrite")  # no marker: not ours to delete
    assert code == 2 and str(tmp_path / "hf") in err and MARKER in err, err
    assert (tmp_path / "hf" / "notes.txt").read_text() == "mine"

    shutil.rmtree(tmp_path / "hf")
    code, err = _run(capsys, *export, "--max-shard-size", "100KB")
    assert code == 0, err
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    code, err = _run(capsys, *export, "--overwrite")
    assert code == 0, err
    written = sorted(path.name for path in (tmp_path / "hf").iterdir())
    marker = json.loads((tmp_path / "hf" / MARKER).read_text())
    assert marker["entries"] == [name for name in written if name != MARKER]
    assert "model-00001-of-00001.safetensors" in written  # the 6 old shards are gone
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]

    (tmp_path / "hf" / "notes.txt").write_text("mine")
    before = _snapshot(tmp_path / "hf")
    code, err = _run(capsys, *export, "--overwrite")
    assert code == 2 and "notes.txt" in err and str(tmp_path / "hf") in err, err
    assert _snapshot(tmp_path / "hf") == before


def test_an_import_is_marked_and_replaced_by_the_next_one(run, sources, capsys):
    marker = json.loads((run / "ckpt" / MARKER).read_text())
    assert marker["entries"] == ["latest", "step_00000000"]
    tensorboard = _snapshot(run / "tensorboard")
    args = ["import", "--vision-encoder", sources["clip_vision"][1], "--output", run / "ckpt"]
    code, err = _run(capsys, *args, "--seed", "7", "--overwrite")
    assert code == 0, err
    assert sorted(os.listdir(run / "ckpt")) == [MARKER, "latest", "step_00000000"]
    assert _snapshot(run / "tensorboard") == tensorboard
    assert sorted(os.listdir(run)) == ["ckpt", "tensorboard"]


def test_a_write_failure_keeps_the_previous_export(run, tmp_path, capsys, monkeypatch):
    export = ["export", "--checkpoint", run / "ckpt", "--output", tmp_path / "hf"]
    code, err = _run(capsys, *export)
    assert code == 0, err
    before = _snapshot(tmp_path / "hf")

    def disk_full(folder, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "README.md"))

    monkeypatch.setattr("mm1_megatron.conversion.exporter._write_side_files", disk_full)
    code, err = _run(capsys, *export, "--overwrite")
    assert code == 2 and "No space left on device" in err and str(tmp_path / "hf") in err, err
    assert _snapshot(tmp_path / "hf") == before
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


@pytest.mark.parametrize("case", ["under_a_file", "read_only_folder"])
def test_an_unwritable_output_is_refused_before_converting(
    case, run, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "blocker"
    if case == "under_a_file":
        blocker.write_text("a file, not a folder")
    else:
        blocker.mkdir(mode=0o555)
        if os.access(blocker, os.W_OK):
            pytest.skip("this user (root) can write into a 0o555 folder")
    monkeypatch.setattr(
        "mm1_megatron.conversion.exporter.CheckpointTensors", _never("read the checkpoint")
    )
    try:
        code, err = _run(
            capsys, "export", "--checkpoint", run / "ckpt", "--output", blocker / "deep" / "hf"
        )
    finally:
        blocker.chmod(0o755)
    assert code == 2 and f"{blocker / 'deep' / 'hf'}" in err and f"{blocker} is not" in err, err


@pytest.fixture(scope="module")
def sharded_llama(sources, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded") / "llama"
    sources["llama"][0].save_pretrained(str(folder), max_shard_size="100KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


def _cut_in_half(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def _damaged_tokenizer(folder):
    make_word_tokenizer(folder)
    (folder / "tokenizer.json").write_text('{"version": ')


DAMAGES = {
    # case: (sharded source?, damage, the file the message names, what it says)
    "truncated_weights": (
        False,
        lambda f: _cut_in_half(f / "model.safetensors"),
        "model.safetensors",
        "truncated",
    ),
    "relabelled_model_type": (
        False,
        lambda f: _edit_config(f, model_type="falcon"),
        "config.json",
        "unsupported language model type: 'falcon'",
    ),
    "config_not_json": (
        False,
        lambda f: (f / "config.json").write_text('{"model_type": "llama", '),
        "config.json",
        "not valid JSON",
    ),
    "no_config": (False, lambda f: (f / "config.json").unlink(), "", "has no config.json"),
    "no_folder": (False, shutil.rmtree, "", "is not a folder"),
    "truncated_index": (
        True,
        lambda f: _cut_in_half(f / "model.safetensors.index.json"),
        "model.safetensors.index.json",
        "cannot read",
    ),
    "missing_shard": (
        True,
        lambda f: sorted(f.glob("model-*.safetensors"))[1].unlink(),
        "model-00002-of-0000",
        "but missing",
    ),
    "damaged_tokenizer": (False, _damaged_tokenizer, "", "cannot load the tokenizer"),
}


@pytest.mark.parametrize("case", sorted(DAMAGES))
def test_damaged_sources_are_refused_naming_the_file(
    case, sources, sharded_llama, tmp_path, capsys, monkeypatch
):
    sharded, damage, named, says = DAMAGES[case]
    source = shutil.copytree(sharded_llama if sharded else sources["llama"][1], tmp_path / "src")
    damage(source)
    monkeypatch.setattr(
        "mm1_megatron.conversion.megatron_io.build_tp1_model", _never("built the model")
    )
    code, err = _run(
        capsys, "import", "--language-model", source, "--output", tmp_path / "out", "--overwrite"
    )
    assert code == 2, err
    assert str(source / named) in err and says in err, err
    assert not (tmp_path / "out").exists()
