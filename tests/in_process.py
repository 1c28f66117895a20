"""Running a real command's ``main(argv)`` inside the pytest process.

A test whose point is not the process boundary (a signal, a kill, a launcher, the README
command) runs the command here instead of in a child: it saves the child's start-up
(~4-6 s of imports) and tests the same code, from argument parsing to the exit code.

What differs from a child, and how it is handled:
- ``main`` configures logging with ``basicConfig(force=True)``, which would remove pytest's
  handlers: ``setup_logging`` is replaced for the call, and what the command logs is
  captured with stdout and stderr (``CommandResult.log``, where a child's stderr would be
  searched); logger levels the command sets are put back.
- ``mm1 train`` and ``mm1 eval`` shut the distributed world down when they end: here the
  session's single-process world (``tests/conftest.py``) stays up instead. Starting it
  again would cost more than time: megatron-core's model-parallel groups outlive a
  shutdown after training (their gloo threads stay, ~19 per world, each polling), so a
  session that restarted its world per command slowed down with every command.
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
    log: str  # everything logged at INFO and above, plus stdout and stderr

    @property
    def stderr(self) -> str:
        """The log, where a test of a child would read its stderr."""
        return self.log


# Loggers whose level a command sets (the trainer shows INFO on the logging rank).
LEVELS_RESTORED = ("", "megatron", "mm1_megatron")


@contextlib.contextmanager
def _levels_restored() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in LEVELS_RESTORED}
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _captured_logging(stream: io.StringIO) -> Iterator[None]:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with _levels_restored():
            yield
    finally:
        root.removeHandler(handler)


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


@contextlib.contextmanager
def _world_kept() -> Iterator[None]:
    """``shutdown_distributed`` (commands import it from ``mm1_megatron.parallel`` when
    they end) leaves the session's world up."""
    import mm1_megatron.parallel as parallel

    original = parallel.shutdown_distributed
    parallel.shutdown_distributed = _keep_the_world
    try:
        yield
    finally:
        parallel.shutdown_distributed = original


def _keep_the_world() -> None:
    """Stands in for ``shutdown_distributed`` during an in-process command."""


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
            _world_kept(),
            _logging_left_alone(main),
            _in_repository(),
            _captured_logging(stream),
            contextlib.redirect_stdout(stream),
            contextlib.redirect_stderr(stream),
        ):
            try:
                code = main(list(argv))
            except SystemExit as exc:  # argparse errors, sys.exit in a command
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=stream)  # what the interpreter would print
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        restore_single_process_world()
    return CommandResult(int(code or 0), stream.getvalue())


def call_in_process(function: Callable, *args) -> None:
    """A single-process worker's function (``layout_worker.run_layouts`` ...) here instead
    of ``python worker.py``, on the session's world: exceptions propagate."""
    try:
        with _world_kept(), _levels_restored(), _logging_left_alone(function), _in_repository():
            function(*args)
    finally:
        restore_single_process_world()


@dataclass
class ScriptResult:
    returncode: int
    stdout: str  # what the script printed, apart from its log
    log: str  # everything logged at INFO and above, plus stderr


def load_script(path: Path):
    """A script of ``tools/`` as a module (its ``if __name__ == "__main__"`` block not
    run), registered under its file name (dataclasses look their module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def run_script(path: Path, argv: Sequence[str]) -> ScriptResult:
    """``python <path> <argv>`` in this process, for a script whose ``main()`` reads
    ``sys.argv`` (``run_main`` for the rest: logging, world, working directory); what it
    prints to stdout is kept apart from its log, as a child's stdout would be."""
    module = load_script(path)
    stdout = io.StringIO()

    def main(args: List[str]):
        saved = sys.argv
        sys.argv = [str(path), *args]
        try:
            with contextlib.redirect_stdout(stdout):
                return module.main()
        finally:
            sys.argv = saved

    main.__module__ = module.__name__  # where run_main replaces setup_logging
    result = run_main(main, argv)
    return ScriptResult(result.returncode, stdout.getvalue(), result.log)


def train_in_process(*overrides: str, config: str = "configs/debug.yaml") -> CommandResult:
    """``mm1 train --config <config> <overrides>`` in this process."""
    from mm1_megatron import train

    return run_main(train.main, ["--config", config, *overrides])
