"""The session's rank pool (``tests/rank_pool.py``): jobs run on every rank in order, a
failure names its rank and traceback and stops the pool, and the next job starts a fresh
one. The functions below are the jobs (the ranks import this module by name)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.rank_pool import RankPool, RankPoolError


def write_rank(folder: str) -> None:
    rank, pid = os.environ["RANK"], os.getpid()
    (Path(folder) / f"rank{rank}.txt").write_text(str(pid))


def fail_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one refuses")


@pytest.fixture
def pool(tmp_path):
    pool = RankPool(2, tmp_path / "pools")
    yield pool
    pool.stop()


def test_jobs_run_on_every_rank_and_a_failure_restarts_the_pool(pool, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    pool.run(f"{__name__}:write_rank", str(first))
    pids = {p.name: p.read_text() for p in first.iterdir()}
    assert sorted(pids) == ["rank0.txt", "rank1.txt"]
    with pytest.raises(RankPoolError, match="(?s)failed on rank 1.*rank one refuses"):
        pool.run(f"{__name__}:fail_on_rank_one")
    assert pool.process.poll() is not None  # stopped: its ranks may have been mid-collective
    pool.run(f"{__name__}:write_rank", str(second))
    restarted = {p.name: p.read_text() for p in second.iterdir()}
    assert pool.generation == 2 and set(restarted.values()).isdisjoint(pids.values())
