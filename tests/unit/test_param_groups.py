"""compat.param_groups: saved param groups paired with live ones whose LR values changed
(megatron-core 0.19 matches groups by their values; 0.16 by their multipliers only)."""

from __future__ import annotations

import pytest

from mm1_megatron.compat import param_groups

KEYS_019 = ("wd_mult", "lr_mult", "is_expert_parallel", "max_lr", "min_lr", "start_wd", "end_wd")


def _group(max_lr, *, expert=False, wd=0.1):
    return dict(
        wd_mult=1.0, lr_mult=1.0, is_expert_parallel=expert, max_lr=max_lr,
        min_lr=max_lr / 10, start_wd=wd, end_wd=wd,
    )  # fmt: skip


@pytest.fixture
def identifiers_019(monkeypatch):
    monkeypatch.setattr(param_groups, "_identifier_keys", lambda: KEYS_019)


def test_changed_peaks_are_paired_in_order_and_the_saved_values_returned(identifiers_019):
    saved = {"optimizer": {"param_groups": [_group(1.0), _group(3.0), _group(1.0, expert=True)]}}
    live = [_group(2.0), _group(6.0), _group(2.0, expert=True)]
    replaced = param_groups.align_saved_param_groups(saved, live)
    assert [g["max_lr"] for g in saved["optimizer"]["param_groups"]] == [2.0, 6.0, 2.0]
    assert {i: v["max_lr"] for i, v in replaced.items()} == {0: 1.0, 1: 3.0, 2: 1.0}
    assert replaced[1]["min_lr"] == pytest.approx(0.3)


def test_matching_groups_are_left_alone(identifiers_019):
    saved = {0: {"optimizer": {"param_groups": [_group(1.0)]}}}  # a chained optimizer's state
    assert param_groups.align_saved_param_groups(saved, [_group(1.0)]) == {}


def test_a_different_group_structure_is_refused(identifiers_019):
    saved = {"param_groups": [_group(1.0), _group(1.0, expert=True)]}
    with pytest.raises(ValueError, match="parameter groups differ"):
        param_groups.align_saved_param_groups(saved, [_group(2.0)])


def test_releases_matching_by_multipliers_only_need_nothing(monkeypatch):
    monkeypatch.setattr(
        param_groups, "_identifier_keys", lambda: ("wd_mult", "lr_mult", "is_expert_parallel")
    )
    saved = {"param_groups": [_group(1.0)]}
    assert param_groups.align_saved_param_groups(saved, [_group(2.0)]) == {}
    assert saved["param_groups"][0]["max_lr"] == 1.0
