"""Train several parallel layouts in one set of processes and record their metrics.

Run under torchrun (or plain python for the single-process references):

    python tests/parallel/layout_worker.py SPEC.json OUT_DIR

SPEC.json: {"steps": N, "layouts": {"name": ["dotted.override=value", ...], ...}}.
Each layout starts from configs/debug.yaml; the logging rank of each layout writes
OUT_DIR/<name>.json with the per-step loss and gradient norm. Paying the interpreter and
Megatron-Core start-up once per world size keeps the whole matrix within CI's budget.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mm1_megatron.utils.logging_setup import setup_logging  # noqa: E402


def _forget_model_parallel_groups() -> None:
    """Megatron-core's ``destroy_model_parallel``, where the next layout may need other
    groups. A world of one (the references, in the pytest process) has one layout of
    groups: they stay, since destroyed groups leave their gloo threads behind."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.get_world_size() > 1:
        parallel_state.destroy_model_parallel()


def release_trainer(trainer) -> None:
    """Frees a finished trainer's model, optimizer and process groups now: megatron-core's
    DDP wrapper sits in a reference cycle through C++ that Python's collector cannot see
    (``tests/rank_pool_worker.py``, ``_release_trained_models``), so each trainer would
    otherwise keep its groups, and their polling gloo threads, for the rest of the job."""
    from tests.rank_pool_worker import clear_rotary_caches

    for chunk in trainer.model_chunks:
        chunk.__dict__.clear()
    clear_rotary_caches()


def run_layouts(spec_path: str, out_dir: str) -> None:
    """Every layout of the spec, one after another; the world group stays up (a rank pool
    runs this; ``main`` adds the shutdown for ``python layout_worker.py``)."""

    from mm1_megatron.config import load_config, validate_config
    from mm1_megatron.training.trainer import Trainer

    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    for name, overrides in spec["layouts"].items():
        cfg = validate_config(
            load_config(
                REPO / "configs/debug.yaml",
                [
                    f"training.train_steps={spec['steps']}",
                    f"logging.output_dir={out / name}",
                    "logging.tensorboard=false",
                    *overrides,
                ],
            )
        )
        trainer = Trainer(cfg)
        history = trainer.train()
        if trainer.is_logging_rank:
            record = [
                {
                    "loss": h["loss"],
                    "grad_norm": h["grad_norm"],
                    "num_images": h["num_images"],
                    "vision_imbalance": h["vision_imbalance"],
                }
                for h in history
            ]
            (out / f"{name}.json").write_text(json.dumps(record))
        release_trainer(trainer)
        del trainer
        _forget_model_parallel_groups()


def main(spec_path: str, out_dir: str) -> None:
    from mm1_megatron.parallel import shutdown_distributed

    setup_logging()
    run_layouts(spec_path, out_dir)
    shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
