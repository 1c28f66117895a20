"""PNG plots of a sweep's runs (matplotlib, Agg backend: no display needed).

Curves are smoothed by a trailing mean over 5% of each run's logged steps (at least one
step); runs are coloured by parameter count, smallest darkest.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from mm1_megatron.scaling.report.fit import PowerLawFit
from mm1_megatron.scaling.report.runs import RunRecord

logger = logging.getLogger(__name__)

SMOOTHING_FRACTION = 0.05
FIGSIZE = (7.0, 4.8)
DPI = 120


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError(
            "mm1 report needs matplotlib for its plots: pip install matplotlib "
            "(it is in the dev extra), or pass --no-plots"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trailing_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Mean of each value and the ``window - 1`` before it (fewer at the start); NaNs
    are left out of the means."""
    values = np.asarray(values, dtype=float)
    known = ~np.isnan(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(known, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(known)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums[ends] - sums[starts]) / (counts[ends] - counts[starts])


def _colours(records: Sequence[RunRecord]) -> Dict[str, tuple]:
    plt = _pyplot()
    ordered = sorted(records, key=lambda r: (r.params_total or 0, r.name))
    cmap = plt.get_cmap("viridis")
    span = max(len(ordered) - 1, 1)
    return {r.name: cmap(0.9 * i / span) for i, r in enumerate(ordered)}


def _log_axis(axis, limits, formatter) -> None:
    """Ticks of a log axis at 1, 2 and 5 per decade (also 3 when the axis spans less than
    a factor 30, every integer multiple under a factor 4), labelled by ``formatter``
    instead of powers of ten."""
    from matplotlib.ticker import LogLocator, NullFormatter

    low, high = sorted(limits)
    span = high / low if low > 0 else 100.0
    if span < 4:
        subs = tuple(float(k) for k in range(1, 10))
    else:
        subs = (1.0, 2.0, 5.0) if span >= 30 else (1.0, 2.0, 3.0, 5.0)
    axis.set_major_locator(LogLocator(base=10.0, subs=subs))
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(NullFormatter())


def _log_log(ax) -> None:
    """Log-log axes, x in engineering units (``20G``), y as plain numbers."""
    from matplotlib.ticker import EngFormatter, FuncFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    _log_axis(ax.xaxis, ax.get_xlim(), EngFormatter(sep=""))
    _log_axis(ax.yaxis, ax.get_ylim(), FuncFormatter(lambda v, _: f"{v:.3g}"))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    logger.info("wrote %s", path)
    return path


def plot_loss_curves(records: List[RunRecord], axis: str, path: Path) -> Optional[Path]:
    """Training loss against cumulative ``tokens`` or ``flops`` (log-log), one line a run."""
    plt = _pyplot()
    colours = _colours(records)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    drawn = 0
    for record in records:
        xs = record.tokens if axis == "tokens" else record.flops
        if not xs or not record.losses:
            continue
        window = max(1, round(SMOOTHING_FRACTION * len(record.losses)))
        smooth = trailing_mean(record.losses, window)
        keep = ~np.isnan(smooth)
        style = "-" if record.status == "complete" else "--"
        label = record.name + ("" if record.status == "complete" else f" ({record.status})")
        ax.plot(np.asarray(xs)[keep], smooth[keep], style, color=colours[record.name], label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    _log_log(ax)
    ax.set_xlabel("tokens seen" if axis == "tokens" else "training FLOPs")
    ax.set_ylabel("training loss (trailing mean, 5% of steps)")
    ax.set_title(f"Training loss vs {'tokens' if axis == 'tokens' else 'training compute'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=math.ceil(drawn / 12))
    return _save(fig, path)


def plot_final_loss(
    names: Sequence[str],
    xs: Sequence[float],
    losses: Sequence[float],
    fit: Optional[PowerLawFit],
    *,
    xlabel: str,
    symbol: str,
    loss_label: str,
    path: Path,
) -> Optional[Path]:
    """Final loss against ``xs`` (log-log), with the fitted power law and its band."""
    if not names:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ax.scatter(xs, losses, color="tab:blue", zorder=3, label="runs")
    for name, x, y in zip(names, xs, losses):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    title = f"Final {loss_label} vs {xlabel}"
    if fit is not None:
        grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 200)
        fit_label = f"fit: {fit.a:.3g} {symbol}^(-{fit.b:.3g})"
        if fit.irreducible:
            fit_label = f"fit: {fit.irreducible:.3g} + {fit.a:.3g} {symbol}^(-{fit.b:.3g})"
        ax.plot(grid, fit.predict(grid), color="tab:red", label=fit_label)
        band = fit.band(grid)
        if band is not None:
            percent = round(100 * fit.confidence)
            ax.fill_between(grid, *band, color="tab:red", alpha=0.2, label=f"{percent}% CI")
            low, high = fit.b_interval
            title += f"\nexponent {fit.b:.3g} ({percent}% CI {low:.3g} to {high:.3g})"
    _log_log(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"final {loss_label}")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_eval_scores(records: List[RunRecord], path: Path) -> Optional[Path]:
    """Each few-shot score against the training FLOPs spent when it was measured (log x)."""
    from matplotlib.ticker import EngFormatter

    measured = [(r.flops_at(r.eval_step), r) for r in records if r.eval_scores]
    runs = sorted(((c, r) for c, r in measured if c), key=lambda pair: pair[0])
    keys = sorted({key for _, r in runs for key in r.eval_scores})
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for key in keys:
        points = [
            (c, r.eval_scores[key], r.status == "complete") for c, r in runs if key in r.eval_scores
        ]
        done = [(c, score) for c, score, complete in points if complete]
        partial = [(c, score) for c, score, complete in points if not complete]
        (line,) = ax.plot(*(zip(*done) if done else ([], [])), "o-", label=key)
        if partial:  # scores of unfinished runs: hollow, off the line
            label = f"{key} (unfinished runs)"
            ax.plot(*zip(*partial), "o", mfc="none", color=line.get_color(), label=label)
    ax.set_xscale("log")
    _log_axis(ax.xaxis, ax.get_xlim(), EngFormatter(sep=""))
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("score (CIDEr-D; VQA accuracy in [0, 1])")
    ax.set_title("Few-shot evaluation vs training compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_throughput(records: List[RunRecord], path: Path) -> Optional[Path]:
    """MFU per run (percent), or achieved TFLOP/s per device when no run knows its peak."""
    use_mfu = any(r.mfu is not None for r in records)
    if use_mfu:
        values = [(r.name, None if r.mfu is None else 100 * r.mfu) for r in records]
    else:
        values = [(r.name, r.tflops_per_device) for r in records]
    values = [(name, v) for name, v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(FIGSIZE[0], max(2.5, 0.45 * len(values) + 1.5)))
    names, numbers = zip(*values)
    ax.barh(names, numbers, color="tab:green")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18 * max(max(numbers), 1e-12))  # room for the numbers
    for y, number in enumerate(numbers):
        ax.annotate(
            f"{number:.3g}",
            (number, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    if use_mfu:
        ax.set_xlabel("MFU (% of peak, median over the second half of the steps)")
        ax.set_title("Model FLOPs utilization per run")
    else:
        ax.set_xlabel("achieved TFLOP/s per device (median over the second half of the steps)")
        ax.set_title("Throughput per run (MFU unknown: no peak FLOP/s logged)")
    ax.grid(True, axis="x", alpha=0.3)
    return _save(fig, path)
