"""``SlowRankDetector``'s report from a gathered table of phases (one process)."""

from __future__ import annotations

import logging

import pytest
import torch

from mm1_megatron.config.schema import StragglerConfig
from mm1_megatron.training.stragglers import PHASES, SlowRankDetector


def _table(own_work):
    """One row per rank: all of a rank's own work as compute, 0.5 s of gradient sync."""
    rows = [[0.0, work, 0.5, 0.01] for work in own_work]
    assert len(rows[0]) == len(PHASES)
    return torch.tensor(rows, dtype=torch.float64)


def test_ranks_over_the_threshold_are_named_slowest_first(caplog):
    detector = SlowRankDetector(StragglerConfig(interval=1, threshold=1.2, max_reported=2), 0)
    detector._hosts = [f"node{r // 4}" for r in range(8)]
    work = [1.0, 1.0, 1.0, 1.5, 1.0, 1.3, 1.0, 2.0]  # median 1.0
    with caplog.at_level(logging.WARNING):
        metrics = detector._report(4, _table(work))
    assert [entry["rank"] for entry in detector.last_report] == [7, 3]  # max_reported 2
    assert detector.last_report[0]["over_median"] == pytest.approx(2.0)
    assert detector.last_report[0]["host"] == "node1"
    assert metrics == {
        "stragglers/slowest_rank": 7.0,
        "stragglers/slowest_over_median": pytest.approx(2.0),
        "stragglers/num_slow_ranks": 3.0,
    }
    assert "rank 7 on node1: 2.00x" in caplog.text and "(and 1 more)" in caplog.text


def test_no_warning_when_every_rank_is_within_the_threshold(caplog):
    detector = SlowRankDetector(StragglerConfig(interval=1), 0)
    detector._hosts = ["a", "b"]
    with caplog.at_level(logging.WARNING):
        metrics = detector._report(1, _table([1.0, 1.1]))
    assert detector.last_report == [] and caplog.text == ""
    assert metrics["stragglers/num_slow_ranks"] == 0.0


def test_gradient_sync_is_moved_out_of_compute():
    detector = SlowRankDetector(StragglerConfig(interval=1), 0)

    def finalize():
        detector._window["_ran"] = True

    timed = detector.timed_gradient_sync(finalize)
    with detector.timed("compute"):
        timed()
    assert detector._window["_ran"]
    assert detector._window["gradient_sync"] >= 0 and detector._window["compute"] >= 0
    # Off: nothing is wrapped and nothing gathered.
    off = SlowRankDetector(StragglerConfig(), 0)
    assert off.timed_gradient_sync(finalize) is finalize
    assert off.end_step(5, report=True) == {}


def test_on_a_gpu_each_phase_boundary_waits_for_the_kernels(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    detector = SlowRankDetector(StragglerConfig(interval=1), 0)
    timed = detector.timed_gradient_sync(lambda: None)
    with detector.timed("compute"):
        timed()
    assert len(syncs) == 4  # before and after the schedule, and the gradient sync in it
    off = SlowRankDetector(StragglerConfig(), 0)
    with off.timed("compute"):
        pass
    assert len(syncs) == 4  # no sync when the detector is off
