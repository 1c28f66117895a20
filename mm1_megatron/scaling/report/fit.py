"""Power law of final loss against compute (or parameters): ``L = E + a * x^(-b)``.

``E`` (the irreducible loss) is not fitted: it is 0 unless the caller knows it (e.g. the
entropy of a synthetic source). Fitting it too needs a non-linear fit that a handful of
runs does not pin down (``E``, ``a`` and ``b`` trade off against each other), so with
``E`` given the fit is ordinary least squares of ``log(L - E)`` on ``log x``, in closed
form. The confidence interval is a bootstrap over runs: resample the points with
replacement (seeded), refit, and take the percentiles of the exponents; resamples whose
points all share one ``x`` have no slope and are dropped. Residuals are in percent of the
fitted loss, ``100 * (L - L_fit) / L_fit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

MIN_POINTS_FOR_CI = 3  # a line through two points has no spread to resample


@dataclass
class PowerLawFit:
    names: List[str]
    x: np.ndarray
    loss: np.ndarray
    a: float
    b: float
    irreducible: float
    confidence: float
    bootstrap_a: np.ndarray  # the fits of the usable resamples
    bootstrap_b: np.ndarray
    num_resamples: int

    def predict(self, x) -> np.ndarray:
        return self.irreducible + self.a * np.asarray(x, dtype=float) ** (-self.b)

    @property
    def residuals_percent(self) -> np.ndarray:
        fitted = self.predict(self.x)
        return 100.0 * (self.loss - fitted) / fitted

    @property
    def b_interval(self) -> Optional[Tuple[float, float]]:
        return _interval(self.bootstrap_b, self.confidence)

    @property
    def a_interval(self) -> Optional[Tuple[float, float]]:
        return _interval(self.bootstrap_a, self.confidence)

    def band(self, x) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Pointwise bootstrap interval of the fitted loss at ``x`` (None without CI)."""
        if self.bootstrap_b.size == 0:
            return None
        x = np.asarray(x, dtype=float)
        curves = self.irreducible + self.bootstrap_a[:, None] * x[None, :] ** (
            -self.bootstrap_b[:, None]
        )
        tail = 50.0 * (1.0 - self.confidence)
        return np.percentile(curves, tail, axis=0), np.percentile(curves, 100.0 - tail, axis=0)

    def summary(self) -> dict:
        residuals = self.residuals_percent
        return {
            "a": self.a,
            "b": self.b,
            "irreducible": self.irreducible,
            "confidence": self.confidence,
            "b_interval": self.b_interval,
            "a_interval": self.a_interval,
            "num_points": int(self.x.size),
            "num_resamples": self.num_resamples,
            "num_resamples_used": int(self.bootstrap_b.size),
            "max_abs_residual_percent": float(np.max(np.abs(residuals))),
            "rms_residual_percent": float(np.sqrt(np.mean(residuals**2))),
            "points": [
                {
                    "name": n,
                    "x": float(x),
                    "loss": float(y),
                    "fitted": float(f),
                    "residual_percent": float(r),
                }
                for n, x, y, f, r in zip(
                    self.names, self.x, self.loss, self.predict(self.x), residuals
                )
            ],
        }


def _interval(samples: np.ndarray, confidence: float) -> Optional[Tuple[float, float]]:
    if samples.size == 0:
        return None
    tail = 50.0 * (1.0 - confidence)
    return float(np.percentile(samples, tail)), float(np.percentile(samples, 100.0 - tail))


def _check_inputs(x, loss, irreducible: float) -> Tuple[np.ndarray, np.ndarray]:
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    if x.shape != loss.shape or x.ndim != 1:
        raise ValueError(
            f"power-law fit: x and loss must be 1-D of equal length, got {x.shape} and {loss.shape}"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(loss))):
        raise ValueError("power-law fit: every x and loss must be finite")
    if np.any(x <= 0):
        raise ValueError(f"power-law fit: x must be positive, got {x.min():g}")
    if np.any(loss <= irreducible):
        raise ValueError(
            f"power-law fit: every loss must exceed the irreducible loss {irreducible:g} "
            f"(smallest loss {loss.min():g}); lower --irreducible-loss"
        )
    if np.unique(x).size < 2:
        raise ValueError(f"power-law fit: needs at least 2 distinct x, got {np.unique(x).size}")
    return x, loss


def _least_squares(log_x: np.ndarray, log_y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Intercepts and slopes of the rows of ``[r, n]`` arrays (closed form)."""
    mean_x, mean_y = log_x.mean(axis=-1, keepdims=True), log_y.mean(axis=-1, keepdims=True)
    dx = log_x - mean_x
    slope = (dx * (log_y - mean_y)).sum(axis=-1) / (dx * dx).sum(axis=-1)
    return mean_y[..., 0] - slope * mean_x[..., 0], slope


def fit_power_law(
    x: Sequence[float],
    loss: Sequence[float],
    *,
    names: Optional[Sequence[str]] = None,
    irreducible: float = 0.0,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PowerLawFit:
    """Fit ``loss = irreducible + a * x^(-b)`` with a bootstrap interval over points."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence}: must lie strictly between 0 and 1")
    if num_resamples < 0:
        raise ValueError(f"num_resamples={num_resamples}: must be >= 0")
    if not math.isfinite(irreducible) or irreducible < 0:
        raise ValueError(f"irreducible loss {irreducible}: must be a finite number >= 0")
    x, loss = _check_inputs(x, loss, irreducible)
    names = [str(i) for i in range(x.size)] if names is None else list(names)
    log_x, log_y = np.log(x), np.log(loss - irreducible)
    intercept, slope = _least_squares(log_x[None, :], log_y[None, :])
    boot_a, boot_b = np.empty(0), np.empty(0)
    if x.size >= MIN_POINTS_FOR_CI and num_resamples > 0:
        rng = np.random.default_rng(seed)
        picks = rng.integers(0, x.size, size=(num_resamples, x.size))
        usable = np.ptp(log_x[picks], axis=1) > 0
        boot_intercept, boot_slope = _least_squares(log_x[picks[usable]], log_y[picks[usable]])
        boot_a, boot_b = np.exp(boot_intercept), -boot_slope
    return PowerLawFit(
        names=names,
        x=x,
        loss=loss,
        a=float(np.exp(intercept[0])),
        b=float(-slope[0]),
        irreducible=float(irreducible),
        confidence=confidence,
        bootstrap_a=boot_a,
        bootstrap_b=boot_b,
        num_resamples=num_resamples,
    )
