"""The Transformer Engine tier: the same tests run on the CPU stand-in or on real TE.

Mode, decided once without importing ``transformer_engine``:

- ``"standin"``: the importable ``transformer_engine`` is ``tests/te/standin`` (put first on
  ``PYTHONPATH`` by ``make test``; ``tests/launch.py`` keeps it first for subprocesses);
- ``"real"``: another ``transformer_engine`` is importable and CUDA is available;
- otherwise every test under ``tests/te`` is skipped with the reason (so a plain
  ``pytest tests`` without the stand-in on the path stays green and fast).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

import pytest

STANDIN_ROOT = Path(__file__).resolve().parent / "standin"
TE_OVERRIDES = ("model.transformer_impl=transformer_engine",)
SKIP_REASON = (
    "Transformer Engine tier: run through `make test` (stand-in: "
    "PYTHONPATH=tests/te/standin) or `make te-check` (real TE with CUDA)"
)


def detect_mode() -> Optional[str]:
    """ "standin", "real" or None (see the module docstring); imports nothing heavy."""
    spec = importlib.util.find_spec("transformer_engine")
    if spec is None or spec.origin is None:
        return None
    if Path(spec.origin).resolve().is_relative_to(STANDIN_ROOT):
        return "standin"
    import torch

    return "real" if torch.cuda.is_available() else None


TE_MODE = detect_mode()


@pytest.fixture(autouse=True)
def _te_tier_only():
    if TE_MODE is None:
        pytest.skip(SKIP_REASON)


@pytest.fixture(scope="session")
def te_mode() -> str:
    """ "standin" or "real"."""
    return TE_MODE


@pytest.fixture(scope="session")
def te_overrides() -> list:
    """Config overrides that select Transformer Engine layers."""
    return list(TE_OVERRIDES)
