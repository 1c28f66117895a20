"""``mm1 <verb>``: the one command line of mm1_megatron.

    mm1 --help                   the verbs
    mm1 <verb> --help            a verb's options
    mm1 train --config configs/debug.yaml training.train_steps=50

Each verb is the ``main(argv)`` of one module (``VERBS``), imported only when that verb
runs, so ``mm1 --help`` and the help of a verb that needs no torch stay fast. The old
``mm1-<verb>`` console scripts call the same functions. Shared option spellings and the
deprecated ones still accepted live in ``mm1_megatron.cli.flags``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional


@dataclass(frozen=True)
class Verb:
    module: str  # its main(argv) runs the verb; its build_parser() describes it
    summary: str  # one line in `mm1 --help`

    @property
    def entry_point(self) -> str:
        """``module:main``, as setup.py names console scripts."""
        return f"{self.module}:main"

    def load(self) -> Callable[[Optional[List[str]]], int]:
        return importlib.import_module(self.module).main


VERBS: Dict[str, Verb] = {
    "train": Verb("mm1_megatron.train", "train a model from config files and dotted overrides"),
    "convert": Verb(
        "mm1_megatron.conversion.cli", "import Hugging Face weights, export checkpoints to them"
    ),
    "eval": Verb(
        "mm1_megatron.evaluation.cli", "few-shot captioning and VQA scores of a checkpoint"
    ),
    "estimate": Verb(
        "mm1_megatron.scaling.estimate.cli",
        "parameters, FLOPs, memory per GPU and the best layouts of a config",
    ),
    "balance": Verb(
        "mm1_megatron.scaling.balance.cli",
        "vision work per data-parallel rank and micro-batch, with and without balancing",
    ),
    "sweep": Verb(
        "mm1_megatron.scaling.sweep.cli", "expand a sweep file into runs, run them, show status"
    ),
    "report": Verb(
        "mm1_megatron.scaling.report.cli",
        "tables, plots and power-law fits of a sweep's runs",
    ),
    "launch": Verb(
        "mm1_megatron.launch.cli", "render and check SLURM / Kubernetes / Docker launch files"
    ),
    "data": Verb(
        "mm1_megatron.data.cli",
        "build tar shards, indexed text and tokenizers from corpora on disk",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The top level only: a verb's own options are its module's ``build_parser()``."""
    parser = argparse.ArgumentParser(
        prog="mm1",
        description=__doc__.split("\n\n")[0].strip("`").replace("``", ""),
        epilog="`mm1 <verb> --help` lists a verb's options.",
    )
    verbs = parser.add_subparsers(dest="verb", metavar="<verb>", title="verbs", required=True)
    for name, verb in VERBS.items():
        verbs.add_parser(name, help=verb.summary, add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in VERBS:
        return VERBS[argv[0]].load()(argv[1:])
    build_parser().parse_args(argv)  # --help, or an unknown verb: exits (2, with the list)
    return 2  # not reached: a known verb was dispatched above
