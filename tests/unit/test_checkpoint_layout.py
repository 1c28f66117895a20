"""Checkpoint folder bookkeeping: manifests, publishing, the latest pointer, retention."""

from __future__ import annotations

import pytest

from mm1_megatron.checkpoint import layout


def _fake_checkpoint(save_dir, step, payload=b"x" * 100):
    tmp = layout.temporary_path(save_dir, step)
    (tmp / "model_optim").mkdir(parents=True)
    (tmp / "model_optim" / "__0_0.distcp").write_bytes(payload)
    (tmp / "trainer_state.json").write_text("{}")
    layout.write_manifest(tmp)
    return layout.publish(save_dir, step)


def test_publish_renames_and_moves_latest(tmp_path):
    first = _fake_checkpoint(tmp_path, 10)
    assert layout.read_latest(tmp_path) == first and first.name == "step_00000010"
    second = _fake_checkpoint(tmp_path, 20)
    assert layout.read_latest(tmp_path) == second
    assert not list(tmp_path.glob(".tmp-*"))
    layout.verify_manifest(second)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "model_optim" / "__0_0.distcp").write_bytes(b"x" * 50), "has 50 bytes"),
        (lambda f: (f / "trainer_state.json").unlink(), "is missing"),
        (lambda f: (f / "manifest.json").unlink(), "never finished"),
    ],
)
def test_verify_manifest_names_the_damage(tmp_path, damage, message):
    folder = _fake_checkpoint(tmp_path, 5)
    damage(folder)
    with pytest.raises(layout.CorruptCheckpointError, match=message):
        layout.verify_manifest(folder)


def test_candidates_start_with_latest_then_newest_first(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / "latest").write_text("step_00000002\n")
    names = [p.name for p in layout.candidates_for_resume(tmp_path)]
    assert names == ["step_00000002", "step_00000003", "step_00000001"]


def test_retention_keeps_last_k_every_nth_and_latest(tmp_path):
    for step in range(1, 11):
        _fake_checkpoint(tmp_path, step)
    removed = layout.apply_retention(tmp_path, keep_last=2, keep_every=4)
    kept = sorted(layout.step_of(p) for p in layout.complete_checkpoints(tmp_path))
    assert kept == [4, 8, 9, 10]
    assert sorted(layout.step_of(p) for p in removed) == [1, 2, 3, 5, 6, 7]


def test_stale_temporaries_are_removed(tmp_path):
    layout.temporary_path(tmp_path, 7).mkdir()
    layout.remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.iterdir())
