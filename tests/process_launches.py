"""Counts the processes each test starts, enforces the ``slow`` marker, and prints a
session-end summary (a pytest plugin, registered by ``tests/conftest.py``).

Starting a process is what makes a test slow here: every Python child pays ~4-6 s of
imports (torch, megatron-core) before it does anything. So a test that starts one must be
marked ``slow`` (``make check`` runs ``-m "not slow"``); an unmarked test that starts one
fails with the command it ran. A launch is seen through Python's audit hooks
(``subprocess.Popen``, ``os.posix_spawn``, ``os.system``), so ``subprocess.run``,
``check_output`` and any library that shells out are counted alike; forks without an exec
(DataLoader workers) start no interpreter and are not counted, and neither is
``multiprocessing``'s spawn start method, which raises no audit event (nothing here uses
it). Rank processes of ``torchrun --nproc-per-node N`` and ``mpiexec -n N`` are counted from
their command line.

The summary also goes to ``$MM1_LAUNCH_LOG`` (JSON) when that is set, for comparing suites.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

# subprocess may start its child through os.posix_spawn after auditing "subprocess.Popen":
# the second event of the same command is not a second launch (``LaunchLedger.audit``).
LAUNCH_EVENTS = ("subprocess.Popen", "os.posix_spawn", "os.system")
RANK_FLAGS = ("--nproc-per-node", "--nproc_per_node", "-n", "-np")
# Counted, but no reason to mark a test slow: megatron-core 0.19 runs `git rev-parse` once
# when it is imported, in whichever test imports it first; the hostile-payload tests prove
# that their payload really runs code with `os.system("touch MARKER")` (milliseconds).
NOT_ENFORCED = ("git", "touch")


@dataclass
class Launch:
    test: str
    command: List[str]

    @property
    def interpreters(self) -> int:
        """Python processes this command starts: its ranks for a launcher, else 0 or 1."""
        words = [os.path.basename(str(w)) for w in self.command]
        if not words or not any(w.startswith("python") for w in words):
            return 0
        launcher = "torch.distributed.run" in self.command or any(
            w in ("torchrun", "mpiexec", "mpirun") for w in words
        )
        ranks = _flag_value(self.command, RANK_FLAGS) if launcher else None
        # torchrun's agent is one more interpreter beside its ranks; mpiexec is not Python.
        agent = 1 if launcher and "mpiexec" not in words and "mpirun" not in words else 0
        return (ranks or 1) + agent

    def brief(self) -> str:
        text = " ".join(str(w) for w in self.command)
        return text if len(text) < 160 else text[:157] + "..."


def _flag_value(command: Sequence[str], flags: Sequence[str]) -> Optional[int]:
    words = [str(w) for w in command]
    for i, word in enumerate(words):
        name, _, inline = word.partition("=")
        if name in flags:
            value = inline or (words[i + 1] if i + 1 < len(words) else "")
            if value.isdigit():
                return int(value)
    return None


@dataclass
class LaunchLedger:
    current_test: Optional[str] = None
    launches: List[Launch] = field(default_factory=list)

    def audit(self, event: str, args: tuple) -> None:
        if self.current_test is None or not event.startswith(LAUNCH_EVENTS):
            return
        command = _command_of(event, args)
        if command is None:
            return
        last = self.launches[-1] if self.launches else None
        repeated = last is not None and (last.test, last.command) == (self.current_test, command)
        if event == "os.posix_spawn" and repeated:
            return
        self.launches.append(Launch(self.current_test, command))

    def of_test(self, nodeid: str) -> List[Launch]:
        return [launch for launch in self.launches if launch.test == nodeid]


def _command_of(event: str, args: tuple) -> Optional[List[str]]:
    # subprocess.Popen: (executable, args, cwd, env); os.posix_spawn: (path, argv, env);
    # os.system: (command,)
    argv = args[1] if len(args) > 1 else None
    if isinstance(argv, (list, tuple)):
        return [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv]
    if isinstance(argv, (str, bytes)):
        return [os.fsdecode(argv) if isinstance(argv, bytes) else argv]
    if not args:
        return None
    first = os.fsdecode(args[0]) if isinstance(args[0], bytes) else str(args[0])
    return first.split() if event == "os.system" else [first]


LEDGER = LaunchLedger()
_hook_installed = {"done": False}


def install() -> None:
    """Audit hooks cannot be removed; install exactly one per interpreter."""
    if not _hook_installed["done"]:
        sys.addaudithook(LEDGER.audit)
        _hook_installed["done"] = True


def pytest_configure(config):
    install()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    LEDGER.current_test = item.nodeid
    try:
        yield
    finally:
        LEDGER.current_test = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "teardown" or item.get_closest_marker("slow") is not None:
        return
    started = [
        launch
        for launch in LEDGER.of_test(item.nodeid)
        if os.path.basename(launch.command[0]) not in NOT_ENFORCED
    ]
    if started and report.passed:
        report.outcome = "failed"
        commands = "\n  ".join(launch.brief() for launch in started)
        report.longrepr = (
            f"{item.nodeid} started {len(started)} process(es) but is not marked slow; "
            f"mark it `@pytest.mark.slow` (or the module: `pytestmark = pytest.mark.slow`), "
            f"or run the code in this process:\n  {commands}"
        )


def summary(launches: Sequence[Launch]) -> Dict[str, object]:
    by_file = Counter(launch.test.split("::")[0] for launch in launches)
    return {
        "commands": len(launches),
        "python_processes": sum(launch.interpreters for launch in launches),
        "tests_that_launch": len({launch.test for launch in launches}),
        "by_file": dict(by_file.most_common()),
    }


def pytest_terminal_summary(terminalreporter):
    totals = summary(LEDGER.launches)
    terminalreporter.write_sep("-", "process launches")
    terminalreporter.write_line(
        f"{totals['commands']} commands started {totals['python_processes']} Python "
        f"processes (torchrun / mpiexec ranks included) in {totals['tests_that_launch']} tests"
    )
    for path, count in list(totals["by_file"].items())[:12]:
        terminalreporter.write_line(f"  {count:3d}  {path}")
    log = os.environ.get("MM1_LAUNCH_LOG")
    if log:
        details = [{"test": x.test, "command": x.brief()} for x in LEDGER.launches]
        Path(log).write_text(json.dumps({**totals, "launches": details}, indent=1))
