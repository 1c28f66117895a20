"""The report's files: ``report.csv`` (one row per run, full precision), ``report.md``
(the table, the fits with their confidence intervals, each point's distance from the fit,
the runs left out and the plots) and ``report.json`` (rows and fit summaries)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from mm1_megatron.scaling.report.analysis import Report
from mm1_megatron.scaling.report.runs import RunRecord

FIT_TITLES = {
    "compute": ("training compute", "C", "training FLOPs"),
    "parameters": ("parameters", "N", "parameters"),
}


def _number(value) -> Optional[float]:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_row(report: Report, record: RunRecord) -> Dict[str, object]:
    row = {
        "name": record.name,
        "label": record.label,
        "status": record.status,
        "sweep_status": record.sweep_status,
        "steps": record.last_step,
        "target_steps": record.target_steps,
        "params_total": record.params_total,
        "params_llm_active_non_embedding": record.params_llm_active_non_embedding,
        "tokens": record.total_tokens,
        "loss_tokens": record.loss_tokens,
        "flops": record.total_flops,
        "train_loss": record.train_loss,
        "train_loss_window": record.train_loss_window or None,
        "heldout_loss": record.heldout_loss,
        "final_loss": record.final_loss(report.loss_kind),
        "compute_fit_residual_percent": report.residual_percent("compute", record.name),
        "params_fit_residual_percent": report.residual_percent("parameters", record.name),
        "mfu": record.mfu,
        "tflops_per_device": record.tflops_per_device,
        "train_seconds": record.train_seconds,
        "eval_source": record.eval_source or None,
        "eval_step": record.eval_step,
    }
    row.update({f"eval:{key}": value for key, value in sorted(record.eval_scores.items())})
    row.update({f"sweep:{key}": value for key, value in sorted(record.sweep_meta.items())})
    row["notes"] = "; ".join(record.notes) or None
    row["path"] = str(record.path)
    return row


def _columns(rows: Sequence[Dict]) -> List[str]:
    columns: List[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    tail = ["notes", "path"]
    return [c for c in columns if c not in tail] + tail


def write_csv(report: Report, path: Path) -> Path:
    rows = [run_row(report, r) for r in report.records]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=_columns(rows), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def human(value, digits: int = 3) -> str:
    """``1.11M``, ``41K``, ``3.2e+15``; ``-`` for nothing."""
    value = _number(value)
    if value is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g}{suffix}"
    return f"{value:.{digits}g}"


def _fmt(value, spec: str) -> str:
    value = _number(value)
    return "-" if value is None else format(value, spec)


def _runs_table(report: Report) -> List[str]:
    score_keys = sorted({k for r in report.records for k in r.eval_scores})
    head = [
        "run",
        "label",
        "status",
        "steps",
        "params",
        "tokens",
        "FLOPs",
        "train loss",
        "held-out loss",
        "MFU %",
        "TFLOP/s/dev",
        *score_keys,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report.records:
        steps = f"{r.last_step}/{r.target_steps}" if r.target_steps else "-"
        cells = [
            r.name,
            r.label or "-",
            r.status,
            steps,
            human(r.params(report.params_kind)),
            human(r.total_tokens),
            _fmt(r.total_flops, ".3e"),
            _fmt(r.train_loss, ".4f"),
            _fmt(r.heldout_loss, ".4f"),
            _fmt(None if r.mfu is None else 100 * r.mfu, ".1f"),
            _fmt(r.tflops_per_device, ".3g"),
        ]
        cells += [
            _fmt(None if k not in r.eval_scores else 100 * r.eval_scores[k], ".1f")
            for k in score_keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _fit_section(report: Report, axis: str) -> List[str]:
    title, symbol, unit = FIT_TITLES[axis]
    if axis == "parameters":
        unit = f"parameters ({report.params_kind})"
    lines = [f"## Fit: final loss vs {title}", ""]
    fit = report.fits[axis]
    if fit is None:
        return lines + [report.fit_notes[axis] + ".", ""]
    s = fit.summary()
    floor = f"{fit.irreducible:.4g} + " if fit.irreducible else ""
    lines.append(
        f"L = {floor}a * {symbol}^(-b), {symbol} in {unit}, least squares in log-log "
        f"over {s['num_points']} runs:"
    )
    lines.append("")
    if s["b_interval"] is not None:
        percent = round(100 * fit.confidence)
        (b_low, b_high), (a_low, a_high) = s["b_interval"], s["a_interval"]
        lines.append(f"- exponent b = **{fit.b:.4g}** ({percent}% CI {b_low:.4g} to {b_high:.4g})")
        lines.append(f"- a = {fit.a:.4g} ({percent}% CI {a_low:.4g} to {a_high:.4g})")
        lines.append(
            f"- bootstrap over runs: {s['num_resamples_used']} of {s['num_resamples']} "
            "resamples usable (the others drew a single size)"
        )
    else:
        lines.append(f"- exponent b = **{fit.b:.4g}**, a = {fit.a:.4g}; {report.fit_notes[axis]}")
    lines.append(
        f"- distance from the fit: RMS {s['rms_residual_percent']:.2f}%, "
        f"largest {s['max_abs_residual_percent']:.2f}%"
    )
    lines += ["", f"| run | {symbol} | final loss | fitted | residual % |", "|---|---|---|---|---|"]
    for p in s["points"]:
        lines.append(
            f"| {p['name']} | {p['x']:.4g} | {p['loss']:.4f} | {p['fitted']:.4f} | "
            f"{p['residual_percent']:+.2f} |"
        )
    return lines + [""]


def markdown(report: Report, plot_paths: Sequence[Path]) -> str:
    num_complete = sum(r.status == "complete" for r in report.records)
    loss_definition = (
        "held-out loss (`heldout/loss`) at each run's last step"
        if report.loss_kind == "heldout"
        else "mean of the last 10% of each run's logged training losses, at most --last-k "
        "of them (the window is in report.csv)"
    )
    lines = [
        "# Scaling report",
        "",
        f"{len(report.records)} runs, {num_complete} complete. Final loss in the fits: "
        f"{loss_definition}. Tokens are sequence positions (global batch x sequence "
        "length per step); FLOPs are the training FLOPs MFU counts. Scores x100.",
        "",
        "## Runs",
        "",
        *_runs_table(report),
        "",
    ]
    for axis in ("compute", "parameters"):
        lines += _fit_section(report, axis)
    if report.excluded:
        lines += ["## Not in the fits", ""]
        lines += [f"- {name}: {why}" for name, why in report.excluded] + [""]
    notes = [(r.name, "; ".join(r.notes)) for r in report.records if r.notes]
    if notes:
        lines += ["## Notes", ""] + [f"- {name}: {text}" for name, text in notes] + [""]
    if plot_paths:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plot_paths] + [""]
    return "\n".join(lines)


def _finite_or_none(value):
    """``value`` with every non-finite float inside it replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_document(report: Report) -> Dict:
    return _finite_or_none(
        {
            "loss_kind": report.loss_kind,
            "params_kind": report.params_kind,
            "runs": [run_row(report, r) for r in report.records],
            "fits": {
                axis: None if fit is None else fit.summary() for axis, fit in report.fits.items()
            },
            "fit_notes": report.fit_notes,
            "excluded": [{"name": n, "reason": why} for n, why in report.excluded],
        }
    )


def write_json(report: Report, path: Path) -> Path:
    path.write_text(json.dumps(json_document(report), indent=2, allow_nan=False) + "\n")
    return path
