"""Damaged, misplaced and mismatched checkpoints: content checksums, ``latest`` kept inside
``save_dir``, readable errors for another model's checkpoint, and resuming with a changed
LR schedule (issue 23, items 6, 7, 8 and 9's checkpoint part).

In-process trainers on the session's single-process world: each costs a second or two,
where a subprocess costs the ~12 s of importing Megatron-Core."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil

import pytest

from mm1_megatron.checkpoint import layout
from mm1_megatron.checkpoint.manager import CheckpointManager, hash_after_writing
from mm1_megatron.checkpoint.manifest import DIGESTS_DIR, file_digest, write_rank_digests
from mm1_megatron.config import load_config
from mm1_megatron.config.schema import CheckpointConfig
from mm1_megatron.training.trainer import Trainer
from tests.conftest import DEBUG_CONFIG, TINY_OVERRIDES

SAVED_STEPS = 4


def _trainer(output, *overrides):
    cfg = load_config(
        DEBUG_CONFIG,
        [
            *TINY_OVERRIDES,
            f"logging.output_dir={output}",
            "logging.tensorboard=false",
            "logging.log_interval=1",
            *overrides,
        ],
    )
    return Trainer(cfg)


def _flip_bytes(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction)
    data[at : at + 4] = bytes(255 - b for b in data[at : at + 4])
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def saved(megatron_single_process, tmp_path_factory):
    """A save folder with checkpoints of steps 2 and 4 of a 4-step run."""
    root = tmp_path_factory.mktemp("saved")
    trainer = _trainer(
        root / "run",
        f"training.train_steps={SAVED_STEPS}",
        f"checkpoint.save_dir={root / 'ckpt'}",
        "checkpoint.save_interval=2",
    )
    trainer.train()
    trainer.checkpoints.close()
    return root / "ckpt"


@pytest.fixture
def copy_of(saved, tmp_path):
    destination = tmp_path / "ckpt"
    shutil.copytree(saved, destination)
    return destination


# ---- the manifest -------------------------------------------------------------------------
def test_manifest_records_a_sha256_of_every_file(saved):
    folder = saved / "step_00000004"
    files = json.loads((folder / "manifest.json").read_text())["files"]
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert sorted(files) == [name for name in on_disk if name != "manifest.json"]
    for name, entry in files.items():
        assert entry["sha256"] == file_digest(folder / name), name
    assert not (folder / DIGESTS_DIR).exists()


def test_same_size_damage_is_detected_by_content(copy_of):
    folder = copy_of / "step_00000004"
    shard = next((folder / "model_optim").glob("__0_*.distcp"))
    _flip_bytes(shard)
    with pytest.raises(layout.CorruptCheckpointError, match=f"{shard.name} is damaged"):
        layout.verify_manifest(folder)


def test_size_only_manifests_of_older_checkpoints_still_load(copy_of):
    folder = copy_of / "step_00000004"
    manifest = folder / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    manifest.write_text(json.dumps({"files": {k: v["size"] for k, v in files.items()}}))
    layout.verify_manifest(folder)
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(layout.CorruptCheckpointError, match="trainer_state.json has 2 bytes"):
        layout.verify_manifest(folder)


def test_ranks_share_the_checking_of_a_checkpoint(copy_of):
    folder = copy_of / "step_00000004"
    names = sorted(json.loads((folder / "manifest.json").read_text())["files"])
    _flip_bytes(folder / names[1])
    layout.verify_manifest(folder, share=(0, 2))  # files 0, 2, 4, ...: intact
    with pytest.raises(layout.CorruptCheckpointError, match="is damaged"):
        layout.verify_manifest(folder, share=(1, 2))


def test_each_rank_hashes_its_own_files_in_the_background_writer(tmp_path):
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

    folder = tmp_path / "tmp-step"

    def write(payload):  # stands for the background writer of rank 3's shards
        (folder / "model_optim").mkdir(parents=True)
        (folder / "model_optim" / "__3_0.distcp").write_bytes(payload)
        (folder / "model_optim" / "__1_0.distcp").write_bytes(b"another rank's")

    request = hash_after_writing(AsyncRequest(write, (b"shard bytes",), []), folder, 3)
    request.async_fn(*request.async_fn_args)
    digests = json.loads((folder / DIGESTS_DIR / "rank_00003.json").read_text())
    assert list(digests) == ["model_optim/__3_0.distcp"]
    write_rank_digests(folder, 1)
    layout.write_manifest(folder)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert (
        files["model_optim/__3_0.distcp"]["sha256"] == digests["model_optim/__3_0.distcp"]["sha256"]
    )
    assert files["model_optim/__3_0.distcp"]["sha256"] == file_digest(
        folder / "model_optim" / "__3_0.distcp"
    )


# ---- choosing the checkpoint ------------------------------------------------------------
def _resume_path(save_dir, **fields):
    return CheckpointManager(
        CheckpointConfig(save_dir=str(save_dir), **fields)
    ).resolve_resume_path()


def test_a_damaged_newest_checkpoint_falls_back_naming_the_file(
    megatron_single_process, copy_of, caplog
):
    shard = copy_of / "step_00000004" / "model_optim" / ".metadata"  # on both releases
    _flip_bytes(shard)
    with caplog.at_level(logging.WARNING):
        chosen = _resume_path(copy_of)
    assert chosen == copy_of / "step_00000002"
    assert f"skipping damaged checkpoint step_00000004: {shard} is damaged" in caplog.text


def test_a_damaged_explicit_checkpoint_is_refused(megatron_single_process, copy_of, tmp_path):
    shard = next((copy_of / "step_00000004" / "model_optim").glob("*.distcp"))
    _flip_bytes(shard)
    with pytest.raises(ValueError, match=f"cannot be loaded: {shard} is damaged"):
        _resume_path(tmp_path / "elsewhere", load_dir=str(copy_of / "step_00000004"))


@pytest.mark.parametrize("pointer", ["outside", "../outside/step_00000004", "step_4", "x\n\0"])
def test_latest_never_names_a_folder_outside_save_dir(
    megatron_single_process, copy_of, tmp_path, caplog, pointer
):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(copy_of / "step_00000004", outside / "step_00000004")
    name = str(outside / "step_00000004") if pointer == "outside" else pointer
    (copy_of / "latest").write_text(name + "\n")
    with caplog.at_level(logging.WARNING):
        chosen = _resume_path(copy_of)
    assert chosen == copy_of / "step_00000002"  # the newest intact one of save_dir
    assert "is not the name of a step_N folder" in caplog.text


def test_latest_naming_a_missing_step_falls_back(megatron_single_process, copy_of):
    shutil.rmtree(copy_of / "step_00000004")
    assert _resume_path(copy_of) == copy_of / "step_00000002"


# ---- another model's checkpoint ---------------------------------------------------------
def test_another_models_checkpoint_names_the_differing_fields(
    megatron_single_process, saved, tmp_path
):
    with pytest.raises(ValueError) as error:
        _trainer(
            tmp_path / "run",
            "model.llm.num_layers=3",
            "model.llm.ffn_hidden_size=96",
            f"training.train_steps={SAVED_STEPS}",
            f"checkpoint.load_dir={saved}",
        )
    message = str(error.value)
    assert f"cannot load checkpoint {saved / 'step_00000004'}" in message
    assert "model.llm.num_layers: 2 in the checkpoint, 3 here" in message
    assert "model.llm.ffn_hidden_size: 64 in the checkpoint, 96 here" in message
    assert len(message) < 3000


def test_a_pretrained_part_of_another_model_names_only_that_part(
    megatron_single_process, saved, tmp_path
):
    with pytest.raises(ValueError) as error:
        _trainer(
            tmp_path / "run",
            "model.vision.ffn_hidden_size=48",
            "model.llm.num_layers=3",  # not the part being loaded: not listed
            f"checkpoint.pretrained_vision_encoder={saved}",
        )
    message = str(error.value)
    assert "model.vision.ffn_hidden_size: 64 in the checkpoint, 48 here" in message
    assert "num_layers" not in message


# ---- a changed LR schedule ----------------------------------------------------------------
def test_extending_a_run_stops_naming_the_schedule_fields(megatron_single_process, saved, tmp_path):
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path / "run", "training.train_steps=8", f"checkpoint.load_dir={saved}")
    message = str(error.value)
    assert "training.train_steps: 4 in the checkpoint, 8 now" in message
    assert "optimizer.schedule_on_resume=config" in message
    assert "optimizer.schedule_on_resume=checkpoint" in message


def _cosine_lr(step, *, peak, floor_ratio, warmup, total):
    """The schedule of training/optimizer.py in closed form: linear warmup, cosine decay."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / (total - warmup)
    return peak * floor_ratio + peak * (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("policy", ["config", "checkpoint"])
def test_schedule_on_resume_takes_the_chosen_schedule(
    megatron_single_process, saved, tmp_path, policy
):
    overrides = ("optimizer.warmup_steps=2", "optimizer.lr_rule=fixed", "optimizer.lr=0.01")
    trainer = _trainer(
        tmp_path / "run",
        *overrides,
        "training.train_steps=8",
        f"optimizer.schedule_on_resume={policy}",
        f"checkpoint.load_dir={saved}",
    )
    assert trainer.step == SAVED_STEPS
    history = trainer.train()
    lrs = {SAVED_STEPS + 1 + i: row["lr"] for i, row in enumerate(history)}
    assert sorted(lrs) == [5, 6, 7, 8]
    saved_cfg = load_config(saved / "step_00000004" / "config.yaml")
    for step, lr in lrs.items():
        if policy == "config":
            expected = _cosine_lr(step, peak=0.01, floor_ratio=0.1, warmup=2, total=8)
        else:  # the saved schedule: it ended at step 4, so the floor from then on
            peak = trainer.scheduler.max_lr
            expected = peak * saved_cfg.optimizer.min_lr_ratio
        assert lr == pytest.approx(expected, rel=1e-6), (policy, step)


def test_changed_module_lr_multipliers_are_a_schedule_change(
    megatron_single_process, saved, tmp_path
):
    expected = "optimizer.lr_multipliers: {} in the checkpoint, {'connector': 3.0} now"
    with pytest.raises(ValueError, match=re.escape(expected)):
        _trainer(
            tmp_path / "run",
            f"training.train_steps={SAVED_STEPS}",
            "optimizer.lr_multipliers.connector=3.0",
            f"checkpoint.load_dir={saved}",
        )


def test_export_and_initial_weights_refuse_a_damaged_checkpoint(
    megatron_single_process, copy_of, tmp_path
):
    from mm1_megatron.conversion.errors import ConversionError
    from mm1_megatron.conversion.megatron_io import resolve_step_folder

    shard = next((copy_of / "step_00000004" / "model_optim").glob("*.distcp"))
    _flip_bytes(shard)
    with pytest.raises(ConversionError, match=f"{shard} is damaged"):
        resolve_step_folder(copy_of)  # what mm1-convert export reads
    with pytest.raises(ValueError, match=f"{shard} is damaged"):  # and mm1-eval, pretrained_*
        _trainer(tmp_path / "run", f"checkpoint.initial_weights={copy_of}")


def test_garbage_behind_a_consistent_manifest_is_a_clear_error(
    megatron_single_process, copy_of, tmp_path
):
    """Same-size garbage in a shard whose manifest was rewritten to match (the checksums
    cannot help): the reader's failure becomes a ValueError naming the checkpoint."""
    folder = copy_of / "step_00000004"
    shard = next((folder / "model_optim").glob("__0_*.distcp"))
    shard.write_bytes(
        bytes(range(256)) * (shard.stat().st_size // 256) + b"\0" * (shard.stat().st_size % 256)
    )
    layout.write_manifest(folder)
    with pytest.raises(ValueError, match=re.escape(str(folder))):  # the shard, on 0.19
        _trainer(
            tmp_path / "run", f"training.train_steps={SAVED_STEPS}", f"checkpoint.load_dir={folder}"
        )
