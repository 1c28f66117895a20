"""``mm1 train``: train an MM1 model from a YAML config plus dotted overrides.

    mm1 train --config configs/debug.yaml training.train_steps=50 model.llm.num_layers=2
    mm1 train --config configs/mm1_3b.yaml --config my_cluster.yaml   # overlays stack
    torchrun --nproc-per-node 2 -m mm1_megatron.train --config configs/debug.yaml \
        parallel.tensor_parallel_size=2
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from mm1_megatron.cli.flags import add_config
from mm1_megatron.utils.logging_setup import setup_logging

logger = logging.getLogger("mm1_megatron.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm1 train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config(parser, "YAML config file (e.g. configs/debug.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.field=value",
        help="dotted overrides applied after the files (lists as YAML: a.b=[x, y])",
    )
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from mm1_megatron.config import load_config, validate_config

    try:
        cfg = validate_config(load_config(args.config, args.overrides))
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    from mm1_megatron.parallel import shutdown_distributed
    from mm1_megatron.training.preemption import (
        EXIT_CONFIG_ERROR,
        EXIT_DIVERGED,
        EXIT_PREEMPTED,
        EXIT_STOPPED_UNSAVED,
        Preempted,
        StoppedWithoutCheckpoint,
        TrainingDiverged,
    )
    from mm1_megatron.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        trainer.train()
    except Preempted as exc:
        logger.warning("%s; checkpoint written, exiting with %d (requeue)", exc, EXIT_PREEMPTED)
        return EXIT_PREEMPTED
    except StoppedWithoutCheckpoint as exc:
        logger.error("%s; exiting with %d (not a requeue code)", exc, EXIT_STOPPED_UNSAVED)
        return EXIT_STOPPED_UNSAVED
    except TrainingDiverged as exc:
        logger.error("%s", exc)
        return EXIT_DIVERGED
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG_ERROR
    finally:
        shutdown_distributed()
    logger.info("done; outputs in %s", cfg.logging.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
