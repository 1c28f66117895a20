"""One uninterrupted run that several checkpoint tests compare with."""

from __future__ import annotations

import pytest

from tests.launch import run_train

REFERENCE_STEPS = 6


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """An uninterrupted debug run of ``REFERENCE_STEPS`` steps that saves every 2 steps
    (``run/metrics.jsonl``, ``ckpt/``). Saving does not change the losses, so runs that
    save differently (asynchronously, on SIGTERM) must reproduce them."""
    out = tmp_path_factory.mktemp("reference")
    result = run_train(
        "logging.tensorboard=false",
        f"training.train_steps={REFERENCE_STEPS}",
        f"logging.output_dir={out / 'run'}",
        f"checkpoint.save_dir={out / 'ckpt'}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out
