"""Snapshots of the fully resolved config of every shipped YAML (``configs/*.yaml``), so a
changed default or include shows up as a diff in review.

    python -m tests.golden.config_snapshots      # rewrite them, on purpose
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT_DIR = Path(__file__).with_name("resolved_configs")


def shipped_configs():
    return sorted((REPO / "configs").glob("*.yaml"))


def resolved_text(config_file: Path) -> str:
    from mm1_megatron.config import load_config
    from mm1_megatron.config.loader import config_to_dict

    return yaml.safe_dump(config_to_dict(load_config(config_file)), sort_keys=False)


def main() -> int:
    SNAPSHOT_DIR.mkdir(exist_ok=True)
    for config_file in shipped_configs():
        (SNAPSHOT_DIR / config_file.name).write_text(resolved_text(config_file))
        print(f"wrote {SNAPSHOT_DIR / config_file.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
