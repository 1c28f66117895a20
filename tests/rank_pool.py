"""One torchrun world per world size, kept alive for the session, running test functions.

Multi-process tests (parallel layouts, generation, conversion loads) used to start a new
``torchrun`` per test file: three interpreters of ~4-6 s start-up each before any work.
A pool starts ``torchrun --nproc-per-node N tests/rank_pool_worker.py DIR`` once, on first
use, and every rank runs the functions it is sent, in order, until the session ends.

The protocol is files in ``DIR`` (no port, no pickle): ``job_<k>.json`` names the
function (``"module:function"``) and its string arguments; every rank calls it and writes
``done_<k>_rank<r>.json`` (``{"ok": true}`` or the traceback). Each job starts the
distributed world it needs (``init_distributed``, as the workers' ``run_*`` functions do)
and the worker shuts it down after the job, so no process group outlives its job. A failed
job, a dead rank or a job past its timeout stops the pool (its ranks may be stuck in a
collective); the next job starts a fresh one. So does a job after which a rank holds too
many gloo threads (``rank_pool_worker.MAX_GLOO_THREADS``): each group's threads poll.
After every job the worker frees the models it trained, whose groups would otherwise stay
(``rank_pool_worker._release_trained_models``), so one pool serves the whole session.

``RankPool.command`` runs a command's ``main(argv)`` the same way (``mm1 train`` or
``mm1 eval`` on N ranks, as ``torchrun --nproc-per-node N -m ...`` would run it) and hands
back its exit code, stdout and stderr.

Not for runs whose point is a fresh process (a resume "in a new process", signals,
launchers, the README's command): those still launch their own command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tests.launch import REPO, clean_env, kill_left_over, launcher

WORKER = Path(__file__).with_name("rank_pool_worker.py")
POLL_SECONDS = 0.02


class RankPoolError(AssertionError):
    """A job failed on a rank, a rank died, or a job ran past its timeout."""


@dataclass
class PoolCommandResult:
    """What ``RankPool.command`` hands back, as ``subprocess.run`` would for torchrun."""

    returncode: int
    stdout: str
    stderr: str


class RankPool:
    def __init__(self, world_size: int, root: Path):
        self.world_size = world_size
        self.root = root
        self.process: Optional[subprocess.Popen] = None
        self.retired: List[subprocess.Popen] = []  # pools whose ranks exit by themselves
        self.next_job = 0
        self.generation = 0  # how many times the pool was (re)started

    @property
    def folder(self) -> Path:
        return self.root / f"world{self.world_size}_start{self.generation}"

    def _start(self) -> None:
        self.generation += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        self.next_job = 0
        log = open(self.folder / "log.txt", "w")  # a file: a full pipe would block the ranks
        command = [*launcher(self.world_size), str(WORKER), str(self.folder)]
        # The ranks exit by themselves once this process is gone (killed pytest, no
        # sessionfinish): they would otherwise poll for jobs forever.
        env = clean_env(MM1_RANK_POOL_OWNER=str(os.getpid()))
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        log.close()

    def run(self, target: str, *args: str, timeout: float = 600) -> None:
        """``target(*args)`` on every rank; raises ``RankPoolError`` with the traceback.
        ``timeout`` stays under pytest's per-test 900 s, and anything that interrupts the
        wait (pytest-timeout, Ctrl-C) stops the pool too: its ranks are still in the job."""
        if self.process is None or self.process.poll() is not None:
            self._start()
        job, self.next_job = self.next_job, self.next_job + 1
        try:
            staged = self.folder / f".job_{job}.json"
            staged.write_text(json.dumps({"target": target, "args": [str(a) for a in args]}))
            staged.rename(self.folder / f"job_{job}.json")  # ranks never see a partial file
            self._wait(job, target, timeout)
        except RankPoolError:
            raise
        except BaseException:
            self.stop(force=True)
            raise

    def command(
        self, target: str, argv: Sequence[str], *, timeout: float = 600
    ) -> PoolCommandResult:
        """``target(argv)``, a command's ``main`` (``"mm1_megatron.train:main"``), on every
        rank (``rank_pool_worker.run_command``): what ``torchrun --nproc-per-node N -m
        mm1_megatron.train ARGV`` runs, without its N + 1 new interpreters. The exit code
        is the first rank's that is not 0 (1 where a rank raised); stdout and stderr are
        the ranks' one after the other (torchrun interleaves their lines), a failed job's
        error last."""
        self.root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"command_world{self.world_size}_", dir=self.root))
        failure = ""
        try:
            self.run(
                "tests.rank_pool_worker:run_command",
                target,
                str(folder),
                json.dumps(list(argv)),
                timeout=timeout,
            )
        except RankPoolError as exc:  # the pool stopped; the files say what the ranks did
            failure = f"\n{exc}"
        ranks = range(self.world_size)
        codes = [_read(folder / f"rank{r}.code", "1") for r in ranks]
        returncode = next((int(c) for c in codes if int(c) != 0), 0)
        if failure and returncode == 0:
            returncode = 1
        stdout = "".join(_read(folder / f"rank{r}.out") for r in ranks)
        stderr = "".join(_read(folder / f"rank{r}.err") for r in ranks) + failure
        return PoolCommandResult(returncode, stdout, stderr)

    def _wait(self, job: int, target: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        done = [self.folder / f"done_{job}_rank{r}.json" for r in range(self.world_size)]
        while True:
            reports = [json.loads(p.read_text()) for p in done if p.exists()]
            failed = [r for r in reports if not r["ok"]]
            if failed:
                self._fail(f"{target} failed on rank {failed[0]['rank']}:\n{failed[0]['error']}")
            if len(reports) == self.world_size:
                if any(r.get("retire") for r in reports):
                    self._retire()
                return
            if self.process.poll() is not None:
                self._fail(f"the pool exited ({self.process.returncode}) during {target}")
            if time.monotonic() > deadline:
                self._fail(f"{target} ran past {timeout:.0f} s")
            time.sleep(POLL_SECONDS)

    def _fail(self, message: str) -> None:
        self.stop(force=True)
        log = (self.folder / "log.txt").read_text()[-6000:]
        raise RankPoolError(f"{message}\n--- pool log ({self.folder}) ---\n{log}")

    def _retire(self) -> None:
        """The ranks that asked to retire exit after their job, the others at the stop
        file: their torchrun winds down while the next job starts a fresh pool (waiting for
        it took 2-3 s per retirement on 2 cores). ``stop`` collects it."""
        (self.folder / "stop").touch()
        self.retired.append(self.process)
        self.process = None

    def _collect_retired(self) -> None:
        for process in self.retired:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _terminate(process)
        self.retired.clear()

    def stop(self, force: bool = False) -> None:
        self._collect_retired()
        if self.process is None or self.process.poll() is not None:
            return
        if not force:
            (self.folder / "stop").touch()
            try:
                self.process.wait(timeout=60)
                return
            except subprocess.TimeoutExpired:
                pass
        _terminate(self.process)


def _read(path: Path, missing: str = "") -> str:
    return path.read_text() if path.exists() else missing


def _terminate(process: subprocess.Popen) -> None:
    """torchrun starts every rank in a session of its own: SIGTERM lets the agent stop
    them; whatever is left (an agent past caring) is killed by pid."""
    import psutil

    try:
        ranks = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:  # exited meanwhile
        ranks = []
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)
    kill_left_over(ranks)


class RankPools:
    """The session's pools, one per world size, started on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.pools: Dict[int, RankPool] = {}

    def __call__(self, world_size: int) -> RankPool:
        if world_size not in self.pools:
            self.pools[world_size] = RankPool(world_size, self.root)
        return self.pools[world_size]

    def stop_all(self) -> None:
        for pool in self.pools.values():
            pool.stop()
        shutil.rmtree(self.root, ignore_errors=True)


_SESSION: Dict[str, RankPools] = {}


def session_pools() -> RankPools:
    """The pools of this pytest session (``tests/conftest.py`` stops them at the end)."""
    if "pools" not in _SESSION:
        _SESSION["pools"] = RankPools(Path(tempfile.mkdtemp(prefix="mm1_rank_pools_")))
    return _SESSION["pools"]


def train_on_pool(
    *overrides: str, nproc: int, config: str = "configs/debug.yaml", timeout: float = 600
) -> PoolCommandResult:
    """``mm1 train --config <config> <overrides>`` on the session's pool of ``nproc``
    ranks: ``tests.launch.run_train(..., nproc=nproc)`` without starting processes."""
    argv = ["--config", config, *overrides]
    return session_pools()(nproc).command("mm1_megatron.train:main", argv, timeout=timeout)


def stop_session_pools() -> None:
    if "pools" in _SESSION:
        _SESSION.pop("pools").stop_all()
