"""A killed process leaves no checkpoint-writer manager behind (``compat/writer_manager.py``).

A child process asks megatron-core's checkpoint writer for its result queue (what the
first save of every training rank does), reports ready, and is SIGKILLed; its manager
server must be gone a few seconds later. Without the replacement (megatron-core's own
function) the manager outlived the child (measured with 0.16.1 and 0.19.2: the orphan
this guards against)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.launch import REPO, kill_left_over

pytestmark = pytest.mark.slow  # starts processes

CHILD = """
import sys, time
from megatron.core.dist_checkpointing.strategies import filesystem_async
from mm1_megatron.compat.writer_manager import _NAMES, install_orphan_free_writer_queue
if sys.argv[1] == "patched":
    install_orphan_free_writer_queue()
name = next(n for n in _NAMES if hasattr(filesystem_async, n))
getattr(filesystem_async, name)().put("ready")
print("ready", flush=True)
time.sleep(600)
"""


def test_the_writer_manager_dies_with_its_killed_process():
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "patched"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    managers = []
    try:
        assert child.stdout.readline().strip() == "ready"
        managers = psutil.Process(child.pid).children(recursive=True)
        assert managers, "the queue started no manager process"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(p.is_running() for p in managers):
            time.sleep(0.1)
        alive = [p for p in managers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    finally:
        child.kill()
        kill_left_over(managers)  # orphans: children of init now, not of this process
