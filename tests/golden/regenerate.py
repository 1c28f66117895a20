"""Rewrite ``debug_30_steps.json`` from fresh runs: only on purpose, when a change is meant
to move the numbers (say why in the commit).

    python -m tests.golden.regenerate          # from the repository root, ~2 minutes
"""

from __future__ import annotations

import json
import sys

from tests.golden.runs import GOLDEN_FILE, RUNS, run_config


def main() -> int:
    import megatron.core
    import torch

    golden = {
        "command": "python -m tests.golden.regenerate",
        "recorded_with": f"torch {torch.__version__}, megatron-core "
        f"{megatron.core.__version__}, Python {sys.version.split()[0]}",
        "runs": {},
    }
    for name in RUNS:
        rows = run_config(name)
        golden["runs"][name] = {
            "loss": [row["loss"] for row in rows],
            "grad_norm": [row["grad_norm"] for row in rows],
        }
        print(f"{name}: loss {rows[0]['loss']:.6f} -> {rows[-1]['loss']:.6f}")
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
