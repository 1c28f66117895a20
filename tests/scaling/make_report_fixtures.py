"""Writes ``fixtures/report_runs``: four real short CPU runs of the debug config at four
language-model sizes (``<name>/``) and their ``sweep.json``, for the ``mm1-report`` tests,
which lay them out as a sweep (``sweep.json`` + ``runs/<name>/``) in a temporary folder
(the repository's ``.gitignore`` ignores every folder named ``runs``).

Each run trains 20 steps of ``configs/debug.yaml`` with a smaller (or the same) decoder,
evaluates every 10 steps (held-out loss on 2 micro-batches, ``synthetic_vqa`` 0-shot on 8
examples), and keeps only what the report reads: ``config.yaml`` as the trainer saved it
and ``metrics.jsonl`` cut down to the fields in ``run_files.READ_FIELDS`` (values
untouched). ``sweep.json`` records what the trainer itself reported: the parameter count
from its start-up log line and the steps it was asked for. Regenerate (about 2 minutes on
2 cores) from the repository root with::

    .venv/bin/python tests/scaling/make_report_fixtures.py

Losses differ slightly between machines and megatron-core lines, so the tests read the
stored numbers rather than hard-coding them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mm1_megatron.scaling.report.run_files import keep_read_fields  # noqa: E402
from tests.launch import run_train  # noqa: E402

FIXTURE = Path(__file__).with_name("fixtures") / "report_runs"
STEPS = 20
GLOBAL_BATCH, SEQ_LENGTH = 8, 256  # configs/debug.yaml
# name: (model.llm.hidden_size, num_layers, ffn_hidden_size); 4 heads, 2 query groups.
SIZES = {
    "llm_h32_l2": (32, 2, 96),
    "llm_h64_l2": (64, 2, 192),
    "llm_h96_l3": (96, 3, 288),
    "llm_h128_l4": (128, 4, 384),
}
COMMON = (
    f"training.train_steps={STEPS}",
    "logging.log_interval=10",
    "logging.tensorboard=false",
    "eval.interval=10",
    "eval.heldout_batches=2",
    "eval.tasks=[synthetic_vqa]",
    "eval.limit=8",
    "eval.shots=[0]",
)
PARAMS_LINE = re.compile(r"parameters: ([\d,]+) total")


def train_one(name: str, hidden: int, layers: int, ffn: int, workdir: Path) -> dict:
    output = workdir / name
    result = run_train(
        *COMMON,
        f"model.llm.hidden_size={hidden}",
        f"model.llm.num_layers={layers}",
        f"model.llm.ffn_hidden_size={ffn}",
        f"logging.output_dir={output}",
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    match = PARAMS_LINE.search(result.stdout + result.stderr)
    if match is None:
        raise RuntimeError(f"{name}: the trainer's parameter line is missing")
    target = FIXTURE / name
    target.mkdir(parents=True)
    shutil.copy(output / "config.yaml", target / "config.yaml")
    lines = (output / "metrics.jsonl").read_text().splitlines()
    kept = [json.dumps(keep_read_fields(json.loads(line))) for line in lines]
    (target / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    params = int(match.group(1).replace(",", ""))
    return {
        "name": name,
        "label": f"{params / 1e6:.2f}M",
        "params": params,
        "tokens": STEPS * GLOBAL_BATCH * SEQ_LENGTH,
        "lr": 0.003,
        "status": "completed",
    }


def main() -> None:
    if FIXTURE.exists():
        shutil.rmtree(FIXTURE)
    FIXTURE.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as workdir:
        runs = [train_one(name, *size, Path(workdir)) for name, size in SIZES.items()]
    sweep = {"name": "report_fixture", "steps": STEPS, "runs": runs}
    (FIXTURE / "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n")
    total = sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file())
    print(f"wrote {FIXTURE} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
