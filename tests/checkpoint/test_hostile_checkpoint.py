"""A received checkpoint runs no code: every file of it that torch or megatron-core read
with pickle is planted with a payload (it would append to a marker file, then hand back
the genuine object so loading carried on) and the manifest is rewritten to match, as an
attacker shipping the folder would. Every command that reads checkpoints must exit 2,
naming the file, with the marker absent.

``.metadata`` goes through all four commands; the common state (``common.pt`` on
megatron-core 0.16, the ``common_state`` byte item on 0.19) and a byte item of a
``.distcp`` file (the vision encoder's ``_extra_state``) through ``mm1-train``; the
readers themselves are tested in process below and in ``tests/unit/test_safe_pickle.py``.
The checkpoint is written by the asynchronous writer with ``dp_reshardable`` optimizer
state (the most byte items), once per module; the commands run three at a time.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import torch

from mm1_megatron.checkpoint.layout import write_manifest
from mm1_megatron.compat.safe_pickle import CheckpointFileError, UnsafePickleError, load_metadata
from tests.conftest import TINY_OVERRIDES
from tests.in_process import run_main, train_in_process
from tests.unit.test_safe_pickle import marker_payload

# Trains and runs the commands (in this process): the slow tier.
pytestmark = pytest.mark.slow

STEP = "step_00000001"
TRAIN = (*TINY_OVERRIDES, "training.train_steps=1", "logging.tensorboard=false")


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A save folder with one tiny checkpoint (``latest`` -> ``step_00000001``)."""
    root = tmp_path_factory.mktemp("hostile")
    result = train_in_process(
        *TRAIN,
        f"checkpoint.save_dir={root / 'ckpt'}",
        "checkpoint.save_interval=1",
        "checkpoint.async_save=true",
        "checkpoint.optimizer_sharding=dp_reshardable",
        f"logging.output_dir={root / 'run'}",
    )
    assert result.returncode == 0, result.log[-3000:]
    return root / "ckpt"


# ---- planting payloads ----------------------------------------------------------------
def _model_optim(save_dir: Path) -> Path:
    return save_dir / STEP / "model_optim"


def _read_metadata(folder: Path):
    with open(folder / ".metadata", "rb") as stream:
        return load_metadata(stream, source=str(folder / ".metadata"))


def plant_in_metadata(save_dir: Path, marker: Path) -> str:
    folder = _model_optim(save_dir)
    payload = marker_payload(marker, _read_metadata(folder))
    (folder / ".metadata").write_bytes(pickle.dumps(payload))
    return str(folder / ".metadata")


def _plant_in_byte_item(folder: Path, marker: Path, item_prefix: str) -> str:
    """Append a payload to the item's ``.distcp`` file and point the metadata (a genuine
    pickle: the attacker writes it too) at it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = _read_metadata(folder)
    index = next(
        i
        for i in sorted(metadata.storage_data, key=lambda i: i.fqn)
        if i.fqn.startswith(item_prefix)
        and isinstance(metadata.state_dict_metadata[i.fqn], BytesStorageMetadata)
    )
    info = metadata.storage_data[index]
    shard = folder / info.relative_path
    with open(shard, "rb") as stream:
        stream.seek(info.offset)
        genuine = torch.load(io.BytesIO(stream.read(info.length)), weights_only=True)
    payload = io.BytesIO()
    torch.save(marker_payload(marker, genuine), payload)
    offset = shard.stat().st_size
    with open(shard, "ab") as stream:
        stream.write(payload.getvalue())
    metadata.storage_data[index] = dataclasses.replace(
        info, offset=offset, length=len(payload.getvalue())
    )
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return str(shard)


def plant_in_extra_state(save_dir: Path, marker: Path) -> str:
    return _plant_in_byte_item(_model_optim(save_dir), marker, "vision_encoder.")


def plant_in_common_state(save_dir: Path, marker: Path) -> str:
    folder = _model_optim(save_dir)
    common = folder / "common.pt"
    if not common.is_file():  # megatron-core 0.19: a byte item of the .distcp files
        return _plant_in_byte_item(folder, marker, "common_state")
    torch.save(marker_payload(marker, torch.load(common, weights_only=True)), common)
    return str(common)


def hostile_copy(genuine: Path, where: Path, plant: Callable[[Path, Path], str]) -> Tuple:
    """(save folder, marker, the planted file) for a copy of ``genuine``."""
    save_dir, marker = where / "ckpt", where / "payload_ran"
    shutil.copytree(genuine, save_dir)
    planted = plant(save_dir, marker)
    write_manifest(save_dir / STEP)
    return save_dir, marker, planted


# ---- the commands (each one's main(argv), run in this process) ------------------------
def _export(save_dir: Path, out: Path):
    from mm1_megatron.conversion.cli import main

    return main, ["export", "--checkpoint", str(save_dir), "--output", str(out)]


def _eval(save_dir: Path, out: Path):
    from mm1_megatron.evaluation.cli import main

    overrides = ["eval.tasks=[synthetic_vqa]", "eval.limit=1"]
    return main, [*overrides, "--checkpoint", str(save_dir), "--output", str(out)]


def _train(*overrides: str) -> Callable:
    def command(save_dir: Path, out: Path):
        from mm1_megatron.train import main

        values = [o.format(save_dir=save_dir, step=save_dir / STEP) for o in overrides]
        return main, [
            "--config",
            "configs/debug.yaml",
            *TRAIN,
            f"logging.output_dir={out}",
            *values,
        ]

    return command


CASES: Dict[str, Tuple[Callable, Callable]] = {
    "metadata-export": (plant_in_metadata, _export),
    "metadata-eval": (plant_in_metadata, _eval),
    "metadata-train-load_dir": (plant_in_metadata, _train("checkpoint.load_dir={step}")),
    "metadata-train-pretrained_vision_encoder": (
        plant_in_metadata,
        _train("checkpoint.pretrained_vision_encoder={save_dir}"),
    ),
    "common_state-train-auto_resume": (
        plant_in_common_state,
        _train("checkpoint.save_dir={save_dir}", "checkpoint.auto_resume=true"),
    ),
    "extra_state-train-initial_weights": (
        plant_in_extra_state,
        _train("checkpoint.initial_weights={save_dir}"),
    ),
}


@pytest.fixture(scope="module")
def outcomes(genuine, tmp_path_factory) -> Dict[str, Tuple]:
    """Every case's (command result, marker, planted file). The commands run in this
    process: a payload that ran would write its marker here just as in a child."""
    results = {}
    for name, (plant, command) in CASES.items():
        where = tmp_path_factory.mktemp(name)
        save_dir, marker, planted = hostile_copy(genuine, where, plant)
        main, argv = command(save_dir, where / "out")
        results[name] = (run_main(main, argv), marker, planted)
    return results


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_planted_payload_never_runs_and_the_command_exits_2(outcomes, case):
    result, marker, planted = outcomes[case]
    assert not marker.exists(), f"the payload ran: {marker.read_text()!r}"
    assert result.returncode == 2, result.log[-3000:]
    errors = [line for line in result.log.splitlines() if " ERROR " in line]
    assert errors and planted in errors[-1] and "refused to unpickle" in errors[-1], errors
    assert "Traceback" not in result.log, result.log[-3000:]


# ---- the readers in process -------------------------------------------------------------
@pytest.fixture
def safe_readers():
    from mm1_megatron.compat.checkpointing import install_safe_loading

    install_safe_loading()


def test_the_real_checkpoints_metadata_passes_the_allowlist(genuine, safe_readers):
    from torch.distributed.checkpoint import FileSystemReader

    folder = _model_optim(genuine)
    expected = pickle.loads((folder / ".metadata").read_bytes())  # our own file: trusted
    loaded = FileSystemReader(str(folder)).read_metadata()
    assert loaded.state_dict_metadata == expected.state_dict_metadata
    assert loaded.storage_data == expected.storage_data


def test_the_genuine_checkpoint_loads_through_the_safe_readers(
    genuine, tiny_config, build_tiny_model
):
    from mm1_megatron.checkpoint import load_model_weights

    model = build_tiny_model(tiny_config(), seed=99)  # not the weights the run started from
    drawn = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    load_model_weights(model, genuine)
    loaded = {k: v for k, v in model.state_dict().items() if k in drawn}
    assert sum(not v.equal(drawn[k]) for k, v in loaded.items()) > len(loaded) // 2


def _common_pt_reader():
    """megatron-core's reader of ``common.pt`` on this release (patched)."""
    from megatron.core.dist_checkpointing.strategies import common

    if hasattr(common, "TorchCommonLoadStrategy"):  # 0.16
        return common.TorchCommonLoadStrategy().load_common
    from megatron.core.dist_checkpointing import serialization  # 0.19: legacy checkpoints

    return serialization.load_common


def test_common_pt_is_read_weights_only_on_every_release(tmp_path, safe_readers):
    marker = tmp_path / "payload_ran"
    torch.save({"optimizer": {"param_groups": [{"lr": 0.1}]}}, tmp_path / "common.pt")
    assert _common_pt_reader()(str(tmp_path))["optimizer"]["param_groups"] == [{"lr": 0.1}]
    torch.save(marker_payload(marker, {"a": 1}), tmp_path / "common.pt")
    with pytest.raises(UnsafePickleError, match=r"common\.pt: refused to unpickle eval"):
        _common_pt_reader()(str(tmp_path))
    assert not marker.exists()


@pytest.mark.parametrize("plant", [plant_in_common_state, plant_in_extra_state])
def test_load_model_weights_refuses_the_other_pickled_files(
    plant, genuine, tmp_path, tiny_config, build_tiny_model
):
    from mm1_megatron.checkpoint import load_model_weights

    save_dir, marker, planted = hostile_copy(genuine, tmp_path, plant)
    model = build_tiny_model(tiny_config())
    with pytest.raises(ValueError, match="refused to unpickle") as refused:
        load_model_weights(model, save_dir)
    assert planted in str(refused.value) and not marker.exists()
    assert isinstance(refused.value, ValueError)


def _garbage(path: Path) -> str:
    path.write_bytes(os.urandom(path.stat().st_size))
    return str(path)


@pytest.mark.parametrize("name", [".metadata", "common.pt"])
def test_same_size_garbage_is_a_value_error_naming_the_file(
    name, genuine, tmp_path, tiny_config, build_tiny_model
):
    from mm1_megatron.checkpoint import load_model_weights

    if not (_model_optim(genuine) / name).is_file():
        pytest.skip(f"megatron-core writes no {name} here")
    save_dir, _, planted = hostile_copy(
        genuine, tmp_path, lambda d, m: _garbage(_model_optim(d) / name)
    )
    model = build_tiny_model(tiny_config())
    with pytest.raises(ValueError, match="is not a readable") as unreadable:
        load_model_weights(model, save_dir)
    assert planted in str(unreadable.value)


def test_the_export_reader_refuses_garbage_metadata(genuine, tmp_path, safe_readers):
    from megatron.core import dist_checkpointing

    save_dir, _, planted = hostile_copy(
        genuine, tmp_path, lambda d, m: _garbage(_model_optim(d) / ".metadata")
    )
    with pytest.raises(CheckpointFileError, match="is not a readable") as unreadable:
        dist_checkpointing.load_tensors_metadata(str(_model_optim(save_dir)))
    assert planted in str(unreadable.value)
    assert not isinstance(unreadable.value, UnsafePickleError)
