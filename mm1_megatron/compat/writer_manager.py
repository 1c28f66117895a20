"""The checkpoint writer's result queue, served by a process that dies with its owner.

Megatron-Core's checkpoint writer (``FileSystemWriterAsync``, used for synchronous saves
too) collects its write results through ``multiprocessing``'s ``Manager().Queue()``: the
first save of every process spawns a manager server process, kept for the process'
life. The server does not watch its parent: when a training rank is killed (SIGKILL from
the OOM killer, a scheduler, torchrun tearing down a group after a failure), its manager
lives on as an orphan, a Python process holding a few hundred MB, one more after each
restart (measured: one orphan per test session here, from the killed-worker test).
The replacement starts the same manager with an initializer that asks Linux to send it
SIGTERM when the process that started it dies (``PR_SET_PDEATHSIG``); elsewhere it is
Megatron-Core's manager unchanged.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import threading
from multiprocessing.managers import SyncManager

from mm1_megatron.compat.patching import replace_attribute

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# megatron-core 0.16 names the function with a leading underscore, 0.19 without.
_NAMES = ("get_write_results_queue", "_get_write_results_queue")
_state: dict = {}


def die_with_parent(parent_pid: int) -> None:
    """A manager server's initializer (runs in the server): SIGTERM when the thread that
    started it exits; exit at once if the parent is already gone. Linux only: elsewhere
    nothing happens."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    if prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != parent_pid:  # died before the request took effect
        os._exit(0)


def write_results_queue(mp_mode: str = "spawn"):
    """Megatron-Core's ``get_write_results_queue``: one queue per process, created on
    first use. Started from the main thread, its manager dies with this process (the
    death signal follows the starting thread, so another thread gets a plain manager)."""
    if "queue" not in _state:
        manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
        if threading.current_thread() is threading.main_thread():
            manager.start(die_with_parent, (os.getpid(),))
        else:
            manager.start()
        _state["manager"], _state["queue"] = manager, manager.Queue()
    return _state["queue"]


def install_orphan_free_writer_queue() -> None:
    """Idempotent."""
    if _state.get("installed"):
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    name = next((n for n in _NAMES if hasattr(filesystem_async, n)), _NAMES[0])
    replace_attribute(
        filesystem_async,
        name,
        write_results_queue,
        reason="its manager process outlives a killed training rank (an orphan per kill); "
        "the replacement's dies with the rank",
        written_for="megatron-core 0.16.1 (_get_write_results_queue), 0.19.2 "
        "(get_write_results_queue)",
    )
    _state["installed"] = True
