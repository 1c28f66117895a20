"""A rank of a ``tests/rank_pool.py`` pool: runs the jobs written to its folder, in order.

torchrun --standalone --nproc-per-node N tests/rank_pool_worker.py FOLDER
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POLL_SECONDS = 0.05
# Megatron-core's model-parallel groups keep their gloo threads after a job that built
# models (even past destroy_process_group: measured 52 after one layout job), and an idle
# rank with 50 of them still burns ~20% of a core. A rank holding more than a fresh world's
# (~21) retires after its job, and the next job starts a fresh pool.
MAX_GLOO_THREADS = 24


def _call(target: str, args) -> None:
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    function(*args)


def _owner_alive() -> bool:
    """The pytest process that started the pool (``MM1_RANK_POOL_OWNER``) still runs."""
    owner = os.environ.get("MM1_RANK_POOL_OWNER")
    if owner is None:
        return True
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return False
    return True


def _gloo_threads() -> int:
    """Threads of gloo's TCP transport in this process (Linux; 0 elsewhere)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return 0
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text())
        except OSError:  # the thread ended meanwhile
            continue
    return sum(name.startswith("gloo_tcp") for name in names)


def _report(folder: Path, job: int, rank: int, error: str = "", retire: bool = False) -> None:
    staged = folder / f".done_{job}_rank{rank}.json"
    record = {"ok": not error, "rank": rank, "error": error, "retire": retire}
    staged.write_text(json.dumps(record))
    staged.rename(folder / f"done_{job}_rank{rank}.json")


def serve(folder: Path) -> int:
    """Every job starts from no distributed state and leaves none: megatron-core's
    model-parallel groups are not destroyed with its globals, and each gloo group keeps
    threads polling; a pool that kept them would slow down with every job. The world is
    started again per job under its own store prefix (``TORCHELASTIC_RESTART_COUNT`` keys
    ``parallel.distributed._elastic_attempt_store``), so no job reads another's addresses."""
    from mm1_megatron.parallel import shutdown_distributed
    from mm1_megatron.utils.logging_setup import setup_logging

    setup_logging()
    rank = int(os.environ["RANK"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    job = 0
    while True:
        request = folder / f"job_{job}.json"
        while not request.exists():
            if (folder / "stop").exists() or not _owner_alive():
                return 0
            time.sleep(POLL_SECONDS)
        spec = json.loads(request.read_text())
        os.environ["TORCHELASTIC_RESTART_COUNT"] = f"{attempt}_job{job}"
        try:
            _call(spec["target"], spec["args"])
            shutdown_distributed()
        except BaseException:  # noqa: BLE001 - reported, then this rank stops the pool
            _report(folder, job, rank, traceback.format_exc())
            return 1
        retire = _gloo_threads() > MAX_GLOO_THREADS
        _report(folder, job, rank, retire=retire)
        if retire:
            return 0
        job += 1


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
