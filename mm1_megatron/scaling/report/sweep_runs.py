"""The runs of a sweep folder: ``<sweep>/sweep.json`` and ``<sweep>/runs/<name>/``.

``sweep.json`` is a JSON object whose ``runs`` list holds one object per run (a bare list
is accepted too). The report reads ``name`` (required: the folder under ``runs/``),
``label`` (or ``size``: shown in tables and legends) and ``status`` (the sweep's own word,
e.g. ``failed`` or ``pending``, shown beside the status read from the run); every other
scalar key (``params``, ``tokens``, ``lr``, ...) is kept as metadata for the table.
Parameters, tokens and FLOPs always come from the run folders themselves. Folders under
``runs/`` that ``sweep.json`` does not list are reported too, with a note.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List

from mm1_megatron.scaling.report.runs import DEFAULT_LAST_K, RunRecord, collect_runs, unreadable_run

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
RUNS_DIR = "runs"


def read_sweep_entries(sweep_dir: Path) -> List[Dict]:
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        raise ValueError(f"sweep folder {sweep_dir}: no {SWEEP_FILE}")
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    entries = document.get("runs") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a 'runs' list of run objects")
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{path}: run #{number} has no 'name' string: {entry!r}")
    return entries


def _apply_entry(record: RunRecord, entry: Dict) -> None:
    label = entry.get("label", entry.get("size"))
    record.label = None if label is None else str(label)
    status = entry.get("status")
    record.sweep_status = None if status is None else str(status)
    record.sweep_meta = {
        key: value
        for key, value in entry.items()
        if key not in ("name", "label", "size", "status")
        and isinstance(value, (str, int, float, bool))
    }


def collect_sweep(sweep_dir, *, last_k: int = DEFAULT_LAST_K) -> List[RunRecord]:
    """Records of every run ``sweep.json`` lists (``missing`` when its folder is absent),
    then of the unlisted folders under ``runs/``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ValueError(f"sweep folder {sweep_dir} does not exist")
    entries = read_sweep_entries(sweep_dir)
    runs_dir = sweep_dir / RUNS_DIR
    listed = {entry["name"] for entry in entries}
    records = []
    for entry in entries:
        folder = runs_dir / entry["name"]
        if folder.is_dir():
            (record,) = collect_runs([folder], last_k=last_k)
            record.name = entry["name"]
        else:
            record = unreadable_run(folder, entry["name"], "missing", "no run folder")
        _apply_entry(record, entry)
        records.append(record)
    extra = sorted(p for p in runs_dir.glob("*") if p.is_dir() and p.name not in listed)
    for record in collect_runs(extra, last_k=last_k):
        record.notes.append(f"not listed in {SWEEP_FILE}")
        records.append(record)
    if not records:
        raise ValueError(f"sweep folder {sweep_dir}: no runs listed or found")
    return records
