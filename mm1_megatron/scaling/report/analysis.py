"""A sweep's report: which runs enter the power-law fits, with which final loss, and the
fits of final loss against training compute and against parameters.

Only ``complete`` runs with a final loss enter a fit. ``loss_kind="auto"`` takes the
held-out loss when every complete run measured it at its last step, else the final
training loss (one definition for all points). ``best_per_size`` keeps, among runs of
one parameter count, the one with the lowest final loss (e.g. the best learning rate).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from mm1_megatron.scaling.report.fit import PowerLawFit, fit_power_law
from mm1_megatron.scaling.report.runs import LOSS_KINDS, RunRecord

logger = logging.getLogger(__name__)

PARAMS_KINDS = ("total", "llm_active_non_embedding")
FIT_AXES = ("compute", "parameters")


@dataclass
class FitPoints:
    names: List[str] = field(default_factory=list)
    x: List[float] = field(default_factory=list)
    loss: List[float] = field(default_factory=list)


@dataclass
class Report:
    records: List[RunRecord]
    loss_kind: str
    params_kind: str
    points: Dict[str, FitPoints]
    fits: Dict[str, Optional[PowerLawFit]]
    fit_notes: Dict[str, str]
    excluded: List[Tuple[str, str]]  # (run, why it is in no fit)

    def residual_percent(self, axis: str, name: str) -> Optional[float]:
        fit = self.fits.get(axis)
        if fit is None or name not in fit.names:
            return None
        return float(fit.residuals_percent[fit.names.index(name)])


def resolve_loss_kind(records: List[RunRecord], loss_kind: str) -> str:
    if loss_kind != "auto" and loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {loss_kind!r}: choose auto, {', '.join(LOSS_KINDS)}")
    if loss_kind != "auto":
        return loss_kind
    complete = [r for r in records if r.status == "complete" and r.train_loss is not None]
    if complete and all(r.heldout_loss is not None for r in complete):
        return "heldout"
    return "train"


def _exclusion(record: RunRecord, loss_kind: str, irreducible: float) -> Optional[str]:
    if record.status != "complete":
        return f"status {record.status}"
    loss = record.final_loss(loss_kind)
    if loss is None or not math.isfinite(loss):
        return f"no final {loss_kind} loss"
    if loss <= irreducible:
        raise ValueError(
            f"irreducible loss {irreducible:g} is not below the final {loss_kind} loss of "
            f"{record.name} ({loss:.4g}): lower --irreducible-loss"
        )
    return None


def _best_per_size(records: List[RunRecord], loss_kind: str) -> Tuple[List, List]:
    best: Dict[int, RunRecord] = {}
    for r in records:
        kept = best.get(r.params_total)
        if kept is None or r.final_loss(loss_kind) < kept.final_loss(loss_kind):
            best[r.params_total] = r
    winners = set(id(r) for r in best.values())
    dropped = [
        (r.name, f"not the lowest loss of its size ({best[r.params_total].name} is)")
        for r in records
        if id(r) not in winners
    ]
    return [r for r in records if id(r) in winners], dropped


def _fit(points: FitPoints, **options) -> Tuple[Optional[PowerLawFit], str]:
    if len(set(points.x)) < 2:
        return None, f"not fitted: needs 2 runs of different size, has {len(set(points.x))}"
    fit = fit_power_law(points.x, points.loss, names=points.names, **options)
    note = "" if fit.b_interval is not None else "no confidence interval: fewer than 3 runs"
    return fit, note


def build_report(
    records: List[RunRecord],
    *,
    loss_kind: str = "auto",
    params_kind: str = "total",
    best_per_size: bool = False,
    irreducible: float = 0.0,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Report:
    if params_kind not in PARAMS_KINDS:
        raise ValueError(f"params kind {params_kind!r}: choose one of {', '.join(PARAMS_KINDS)}")
    loss_kind = resolve_loss_kind(records, loss_kind)
    excluded, eligible = [], []
    for record in records:
        reason = _exclusion(record, loss_kind, irreducible)
        if reason:
            excluded.append((record.name, reason))
        else:
            eligible.append(record)
    if best_per_size:
        eligible, dropped = _best_per_size(eligible, loss_kind)
        excluded.extend(dropped)
    points = {axis: FitPoints() for axis in FIT_AXES}
    for record in eligible:
        loss = record.final_loss(loss_kind)
        xs = {"compute": record.total_flops, "parameters": record.params(params_kind)}
        for axis, x in xs.items():
            if x:
                points[axis].names.append(record.name)
                points[axis].x.append(float(x))
                points[axis].loss.append(loss)
    fits, notes = {}, {}
    options = dict(irreducible=irreducible, num_resamples=num_resamples, confidence=confidence)
    for axis in FIT_AXES:
        fits[axis], notes[axis] = _fit(points[axis], seed=seed, **options)
        if fits[axis] is not None:
            logger.info("%s fit: exponent %.4g over %d runs", axis, fits[axis].b, len(fits[axis].x))
    return Report(records, loss_kind, params_kind, points, fits, notes, excluded)
