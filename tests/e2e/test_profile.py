"""``logging.profile``: two debug steps traced by torch.profiler, next to the run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.in_process import train_in_process


def test_two_traced_steps_write_a_chrome_trace_and_a_summary(tmp_path):
    result = train_in_process(
        f"logging.output_dir={tmp_path}",
        *TINY_OVERRIDES,
        "training.train_steps=3",
        "logging.profile.start_step=2",
        "logging.profile.num_steps=2",
        "logging.profile.memory_snapshot=true",
    )
    assert result.returncode == 0, result.log[-3000:]
    folder = tmp_path / "profile"
    assert sorted(p.name for p in folder.iterdir()) == [
        "rank0_steps2-3.pt.trace.json",
        "rank0_steps2-3.txt",
    ]
    assert "memory_snapshot needs CUDA" in result.log
    events = json.loads((folder / "rank0_steps2-3.pt.trace.json").read_text())["traceEvents"]
    names = {event.get("name") for event in events}
    # Exactly the traced steps, each under its range, with the model's operators inside.
    assert {"mm1/train_step_2", "mm1/train_step_3"} <= names
    assert "mm1/train_step_1" not in names
    assert any(str(name).startswith("aten::") for name in names)
    steps = [e for e in events if str(e.get("name")).startswith("mm1/train_step_")]
    assert all(e["dur"] > 0 for e in steps)
    summary = (folder / "rank0_steps2-3.txt").read_text()
    assert "Self CPU" in summary and "aten::" in summary
    # Training went on as usual: every step logged.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_the_trace_passes_torch_profiler_s_own_validator(tmp_path):
    """``torch.profiler._trace_validator`` (torch >= 2.13) opens the trace and checks it
    against the rules torch derived from broken traces."""
    validator = pytest.importorskip("torch.profiler._trace_validator")
    result = train_in_process(
        f"logging.output_dir={tmp_path}",
        *TINY_OVERRIDES,
        "training.train_steps=1",
        "logging.profile.start_step=1",
        "logging.profile.num_steps=1",
    )
    assert result.returncode == 0, result.log[-3000:]
    passed, violations = validator.validate_trace(
        str(tmp_path / "profile" / "rank0_steps1-1.pt.trace.json")
    )
    assert passed, violations
