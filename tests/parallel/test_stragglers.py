"""Slow-rank detection (``logging.stragglers``) on two data-parallel gloo ranks, one of
them delayed in its forward step (a slow GPU): the report names that rank, though every
rank's step takes as long (the fast one waits in the gradient sync). The job runs on the
session's rank pool."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import TINY_OVERRIDES
from tests.launch import REPO

DELAYED_RANK = 1
DELAY_S = 0.3


def _delayed(forward_step):
    """The trainer's forward step, each micro-batch ``DELAY_S`` late."""

    def slow_forward_step(*args, **kwargs):
        time.sleep(DELAY_S)
        return forward_step(*args, **kwargs)

    return slow_forward_step


def train_with_a_delayed_rank(folder: str) -> None:
    from mm1_megatron.config import load_config
    from mm1_megatron.training.trainer import Trainer

    out = Path(folder)
    cfg = load_config(
        REPO / "configs/debug.yaml",
        [
            *TINY_OVERRIDES,
            "training.train_steps=4",
            "training.micro_batch_size=2",
            f"logging.output_dir={out / 'run'}",
            "logging.tensorboard=false",
            "logging.stragglers.interval=2",
        ],
    )
    trainer = Trainer(cfg)
    if int(os.environ["RANK"]) == DELAYED_RANK:
        trainer._forward_step = _delayed(trainer._forward_step)
    history = trainer.train()
    if trainer.is_logging_rank:
        record = {"report": trainer.stragglers.last_report, "history": history}
        (out / "stragglers.json").write_text(json.dumps(record))


def test_the_delayed_rank_is_named(tmp_path):
    from tests.rank_pool import session_pools

    session_pools()(2).run(f"{__name__}:train_with_a_delayed_rank", str(tmp_path))
    record = json.loads((tmp_path / "stragglers.json").read_text())
    (slow,) = record["report"]
    assert slow["rank"] == DELAYED_RANK
    assert slow["over_median"] > 1.2
    # The delay shows as its compute (2 micro-batches a step), and as the other rank's
    # gradient sync rather than as its own work.
    assert slow["compute"] > 2 * DELAY_S * 0.9
    steps = record["history"]
    assert [s.get("stragglers/slowest_rank") for s in steps] == [None, 1.0, None, 1.0]
    assert all(s["stragglers/num_slow_ranks"] == 1.0 for s in steps[1::2])
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(log[1])["stragglers/slowest_rank"] == DELAYED_RANK
