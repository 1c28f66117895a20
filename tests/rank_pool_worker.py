"""A rank of a ``tests/rank_pool.py`` pool: runs the jobs written to its folder, in order.

torchrun --standalone --nproc-per-node N tests/rank_pool_worker.py FOLDER
"""

from __future__ import annotations

import contextlib
import gc
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
# A process group's gloo threads live as long as the group, and an idle rank with 50 of
# them still burns ~20% of a core. A job's trained models would keep theirs past
# destroy_process_group (``_release_trained_models``; measured: 52 threads after one
# layout job without it, 2 after any number of jobs with it). A rank holding more than a
# fresh world's (~21) retires after its job, and the next job starts a fresh pool.
MAX_GLOO_THREADS = 24


def _resolve(target: str):
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def _call(target: str, args) -> None:
    _resolve(target)(*args)


def run_command(target: str, folder: str, argv: str) -> None:
    """A job: a command's ``main(argv)`` (``target``, e.g. ``"mm1_megatron.train:main"``;
    ``argv`` as JSON) on this rank, as ``torchrun ... -m mm1_megatron.train`` runs it: the
    same environment (rank, world size, rendezvous), from argument parsing to the exit
    code, without starting new interpreters (``RankPool.command``). Its stdout and
    stderr, its log included (``setup_logging`` writes to ``sys.stderr``), go to
    ``folder/rank<r>.out`` and ``rank<r>.err``, its exit code to ``rank<r>.code``. An
    exception is written there too, then raised: the other ranks may be stuck in a
    collective, and the failed job stops the pool."""
    from mm1_megatron.utils.logging_setup import setup_logging

    out, rank = Path(folder), os.environ["RANK"]
    code = 1
    try:
        with (
            open(out / f"rank{rank}.out", "w") as stdout,
            open(out / f"rank{rank}.err", "w") as stderr,
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            try:
                code = _resolve(target)(json.loads(argv))
            except SystemExit as exc:  # argparse, sys.exit: as the interpreter would exit
                if exc.code is not None and not isinstance(exc.code, int):
                    print(exc.code, file=sys.stderr)
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
                raise
    finally:
        setup_logging()  # the command's log went to the files above: this rank's log again
        (out / f"rank{rank}.code").write_text(str(code or 0))


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


# Megatron-Core caches ``forward`` of its rotary embeddings with ``lru_cache`` on the
# method: each entry holds its embedding and, through it, that model's process groups.
ROTARY_CACHES = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "YarnRotaryEmbedding",
}


def clear_rotary_caches() -> None:
    """Empties those caches (a later forward computes its table again)."""
    for module_name, class_name in ROTARY_CACHES.items():
        forward = getattr(getattr(sys.modules.get(module_name), class_name, None), "forward", None)
        if hasattr(forward, "cache_clear"):
            forward.cache_clear()


def _release_trained_models() -> int:
    """Frees the models a finished job trained, and with them their process groups.

    Megatron-Core's ``DistributedDataParallel`` registers its gradient hooks on the
    parameters' autograd accumulators: those C++ nodes hold the hooks, the hooks the
    wrapper, the wrapper the model, the optimizer and the groups, and the distributed
    optimizer's parameter shards (views of the parameters) hold the nodes again. Python's
    collector cannot see a cycle through C++, so every trainer a job built outlived it,
    and each group kept its gloo threads (which made the pool retire after every job that
    trained, and the next job pay a fresh pool's start-up: ~10 s on 2 cores). Emptying
    each wrapper left over breaks the cycle; the job is over, nothing uses them again.
    Returns how many there were."""
    distributed = sys.modules.get("megatron.core.distributed")
    if distributed is None:  # the job trained nothing
        return 0
    gc.collect()
    wrapper_class = distributed.DistributedDataParallel
    leftovers = [obj for obj in gc.get_objects() if isinstance(obj, wrapper_class)]
    for wrapper in leftovers:
        wrapper.__dict__.clear()
    count = len(leftovers)
    del leftovers
    clear_rotary_caches()
    gc.collect()
    return count


def _report(
    folder: Path, job: int, rank: int, error: str = "", retire: bool = False, threads: int = 0
) -> None:
    staged = folder / f".done_{job}_rank{rank}.json"
    record = {"ok": not error, "rank": rank, "error": error, "retire": retire, "gloo": threads}
    staged.write_text(json.dumps(record))
    staged.rename(folder / f"done_{job}_rank{rank}.json")


def _shutdown_distributed() -> None:
    """``shutdown_distributed`` after a job that imported torch: a job that did not (the
    pool's own tests) started no world, and a rank imports torch (seconds) only for a job
    that needs it."""
    if "torch.distributed" in sys.modules:
        from mm1_megatron.parallel import shutdown_distributed

        shutdown_distributed()


def serve(folder: Path) -> int:
    """Every job starts from no distributed state and leaves none: megatron-core's
    model-parallel groups are not destroyed with its globals, and each gloo group keeps
    threads polling; a pool that kept them would slow down with every job. The world is
    started again per job under its own store prefix (``TORCHELASTIC_RESTART_COUNT`` keys
    ``parallel.distributed._elastic_attempt_store``), so no job reads another's addresses."""
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
            _shutdown_distributed()
            _release_trained_models()
        except BaseException:  # noqa: BLE001 - reported, then this rank stops the pool
            _report(folder, job, rank, traceback.format_exc())
            return 1
        threads = _gloo_threads()
        retire = threads > MAX_GLOO_THREADS
        _report(folder, job, rank, retire=retire, threads=threads)
        if retire:
            return 0
        job += 1


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1])))
