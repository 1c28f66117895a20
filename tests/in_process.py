"""Running a real command's ``main(argv)`` inside the pytest process.

A test whose point is not the process boundary (a signal, a kill, a launcher, the README
command) runs the command here instead of in a child: it saves the child's start-up
(~4-6 s of imports) and tests the same code, from argument parsing to the exit code.

What differs from a child, and how it is handled:
- ``main`` configures logging with ``basicConfig(force=True)``, which would remove pytest's
  handlers: ``setup_logging`` is replaced for the call, and what the command logs is
  captured (``CommandResult.log``, where a child's stderr would be searched).
- ``mm1 train`` shuts the distributed world down when it ends: the single-process world
  of the session (``tests/conftest.py``) is started again afterwards.
- The working directory is the repository root, as for ``tests.launch.run``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Sequence

REPO = Path(__file__).resolve().parents[1]
# " LEVEL " between spaces, as in the commands' own format (tests search " ERROR ").
LOG_FORMAT = "[in-process] %(levelname)s %(name)s: %(message)s"


@dataclass
class CommandResult:
    returncode: int
    log: str  # everything logged at INFO and above, plus stdout


@contextlib.contextmanager
def _captured_logging(stream: io.StringIO) -> Iterator[None]:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def _in_repository() -> Iterator[None]:
    before = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


def restore_single_process_world() -> None:
    """The session's gloo world of one process and its model-parallel groups, where a
    command shut them down (``init_distributed`` starts only what is missing)."""
    from mm1_megatron.config import ParallelConfig
    from mm1_megatron.parallel import init_distributed

    init_distributed(ParallelConfig())


def _leave_logging_alone(*args, **kwargs) -> None:
    """Stands in for ``setup_logging``: pytest's handlers stay, ours captures."""


@contextlib.contextmanager
def _logging_left_alone(function: Callable) -> Iterator[None]:
    """``setup_logging`` replaced where ``function``'s module imported it, and at home."""
    import mm1_megatron.utils.logging_setup as logging_setup

    owners = {logging_setup, sys.modules[function.__module__]}
    originals = {owner: owner.setup_logging for owner in owners if hasattr(owner, "setup_logging")}
    for owner in originals:
        owner.setup_logging = _leave_logging_alone
    try:
        yield
    finally:
        for owner, original in originals.items():
            owner.setup_logging = original


def run_main(main: Callable[[List[str]], int], argv: Sequence[str]) -> CommandResult:
    """``main(argv)`` in this process: its exit code (``SystemExit`` included) and log."""
    stream = io.StringIO()
    try:
        with (
            _logging_left_alone(main),
            _in_repository(),
            _captured_logging(stream),
            contextlib.redirect_stdout(stream),
        ):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse errors, sys.exit in a command
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        restore_single_process_world()
    return CommandResult(int(code or 0), stream.getvalue())


def call_in_process(function: Callable, *args) -> None:
    """A single-process worker's ``main(*args)`` (``tests/parallel/layout_worker.py`` ...)
    here instead of ``python worker.py``: exceptions propagate, the world is restored."""
    try:
        with _logging_left_alone(function), _in_repository():
            function(*args)
    finally:
        restore_single_process_world()


def train_in_process(*overrides: str, config: str = "configs/debug.yaml") -> CommandResult:
    """``mm1 train --config <config> <overrides>`` in this process."""
    from mm1_megatron import train

    return run_main(train.main, ["--config", config, *overrides])
