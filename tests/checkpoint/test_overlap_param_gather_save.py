"""A checkpoint saved with an overlapped parameter all-gather holds the updated weights.

With the distributed optimizer and ``parallel.overlap_param_gather=true``, Megatron-Core's
DDP all-gathers the updated parameters lazily, in the pre-forward hooks of the NEXT step:
right after ``optimizer.step()`` each data-parallel rank's model parameters are updated
only in the shard that rank's optimizer owns. ``Trainer.save_checkpoint`` therefore forces
the gather before writing. The resume test cannot see a missing gather (resume restores
the weights from the optimizer's fp32 main params), so this test reads the MODEL tensors
that the checkpoints store, as an export would, and compares them directly:

- DP=2, distributed optimizer, both overlaps on, N steps, save at the end;
- the same with both overlaps off (the gather happens inside ``optimizer.step()``);
- the initial weights, built here: the same config and ``training.seed`` give the same
  weights at every layout (``init_seed``), as an unwrapped TP=1 model.

Overlapping changes only when the same reductions run, not what they compute, so the two
trained checkpoints must be bitwise equal. Both must differ from the initial weights in
every tensor (the test cannot pass on two untouched models), and by at most a few Adam
steps of the peak LR (so the initial weights built here really are the run's).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm1_megatron.config.schema import MODEL_PARTS
from tests.conftest import IMAGE_TOKEN_ID, TINY_OVERRIDES
from tests.parallel.test_layouts import OVERLAP, _run_worker

STEPS = 2
COMMON = [
    *TINY_OVERRIDES,
    "training.micro_batch_size=2",  # global 8 over DP=2: two micro-batches per rank
    "parallel.use_distributed_optimizer=true",
    "optimizer.warmup_steps=0",  # every step moves the weights, the last one included
]
NO_OVERLAP = ["parallel.overlap_grad_reduce=false", "parallel.overlap_param_gather=false"]
RUNS = {"overlapped": OVERLAP, "not_overlapped": NO_OVERLAP}


def _model_tensors(step_folder: Path, cfg) -> dict:
    """Every model tensor the checkpoint stores, by our TP=1 names (as an export reads them)."""
    from mm1_megatron.conversion.checkpoint_stream import CheckpointTensors

    source = CheckpointTensors(step_folder, cfg.model, MODEL_PARTS, image_token_id=IMAGE_TOKEN_ID)
    names = source.names()
    assert names, f"{step_folder} has no model tensors"
    return source.fetch(names)


def _initial_tensors(cfg, names) -> dict:
    """The weights training started from: the run's model at TP=1, seeded as the trainer
    seeds it (``init_seed=training.seed``)."""
    from mm1_megatron.conversion.megatron_io import build_tp1_model, state_of

    model = build_tp1_model(cfg.model, image_token_id=IMAGE_TOKEN_ID, seed=cfg.training.seed)
    state = state_of(model)
    return {name: state[name].detach().clone() for name in names}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, megatron_single_process):
    from mm1_megatron.checkpoint.layout import checkpoint_name, read_latest
    from mm1_megatron.config import load_config

    out = tmp_path_factory.mktemp("overlap_save")
    _run_worker(
        2,
        {
            name: COMMON + overrides + [f"checkpoint.save_dir={out / 'ckpt' / name}"]
            for name, overrides in RUNS.items()
        },
        out,
        steps=STEPS,
    )
    tensors = {}
    for name in RUNS:
        folder = read_latest(out / "ckpt" / name)
        assert folder is not None, f"run {name} wrote no checkpoint"
        assert folder.name == checkpoint_name(STEPS), folder
        cfg = load_config(folder / "config.yaml")
        tensors[name] = _model_tensors(folder, cfg)
    tensors["initial"] = _initial_tensors(cfg, sorted(tensors["overlapped"]))
    tensors["lr"] = cfg.optimizer.lr
    return tensors


def _first_difference(expected: dict, got: dict):
    """``(name, max |difference|)`` of the first tensor that differs, else ``None``."""
    assert sorted(expected) == sorted(got), "the checkpoints hold different tensors"
    for name in sorted(expected):
        if not torch.equal(expected[name], got[name]):
            return name, float((expected[name] - got[name]).abs().max())
    return None


def test_overlapped_save_stores_the_gathered_weights(checkpoints):
    difference = _first_difference(checkpoints["not_overlapped"], checkpoints["overlapped"])
    assert difference is None, (
        "the checkpoint saved with overlap_param_gather=true differs from the one saved "
        f"without overlap, first at {difference[0]} (max |difference| {difference[1]:.3g}): "
        "the parameter all-gather of the last step did not run before the save"
    )


@pytest.mark.parametrize("run", sorted(RUNS))
def test_training_moved_every_tensor_by_a_few_steps(checkpoints, run):
    initial, trained = checkpoints["initial"], checkpoints[run]
    assert sorted(initial) == sorted(trained)
    unchanged = [name for name in sorted(initial) if torch.equal(initial[name], trained[name])]
    assert not unchanged, (
        f"{run}: {len(unchanged)} of {len(initial)} tensors kept their initial values, "
        f"e.g. {unchanged[0]}"
    )
    # An Adam step moves a weight by about the LR: far less than two different random
    # initialisations differ by, so this also checks the initial weights built here.
    bound = 2 * STEPS * checkpoints["lr"]
    for name in sorted(initial):
        moved = float((trained[name] - initial[name]).abs().max())
        assert moved <= bound, f"{run}: {name} moved by {moved:.3g} > {bound:.3g}"
