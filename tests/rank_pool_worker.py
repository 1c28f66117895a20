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

POLL_SECONDS = 0.02


def _call(target: str, args) -> None:
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    function(*args)


def _report(folder: Path, job: int, rank: int, error: str = "") -> None:
    staged = folder / f".done_{job}_rank{rank}.json"
    staged.write_text(json.dumps({"ok": not error, "rank": rank, "error": error}))
    staged.rename(folder / f"done_{job}_rank{rank}.json")


def serve(folder: Path) -> int:
    from mm1_megatron.utils.logging_setup import setup_logging

    setup_logging()
    rank = int(os.environ["RANK"])
    job = 0
    while True:
        request = folder / f"job_{job}.json"
        while not request.exists():
            if (folder / "stop").exists():
                from mm1_megatron.parallel import shutdown_distributed

                shutdown_distributed()
                return 0
            time.sleep(POLL_SECONDS)
        spec = json.loads(request.read_text())
        try:
            _call(spec["target"], spec["args"])
        except BaseException:  # noqa: BLE001 - reported, then this rank stops the pool
            _report(folder, job, rank, traceback.format_exc())
            return 1
        _report(folder, job, rank)
        job += 1


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
