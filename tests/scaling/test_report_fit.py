"""The power-law fit (``mm1_megatron.scaling.report.fit``) against closed forms and numpy."""

from __future__ import annotations

import numpy as np
import pytest

from mm1_megatron.scaling.report.fit import fit_power_law

COMPUTE = np.geomspace(1e15, 1e19, 7)


def test_exact_power_law_is_recovered_with_zero_residuals():
    a, b = 2.0e3, 0.176
    loss = a * COMPUTE ** (-b)
    fit = fit_power_law(COMPUTE, loss, num_resamples=500, seed=3)
    assert fit.b == pytest.approx(b, rel=1e-10)
    assert fit.a == pytest.approx(a, rel=1e-8)
    assert np.abs(fit.residuals_percent).max() < 1e-9
    # Every resample of exact points lies on the same line: the interval is the exponent.
    low, high = fit.b_interval
    assert low == pytest.approx(b, rel=1e-9) and high == pytest.approx(b, rel=1e-9)
    assert fit.bootstrap_b.size == 500  # 7 points: a single-size resample is ~1e-5 likely


def test_noisy_fit_matches_numpy_polyfit_and_its_interval_holds_the_truth():
    rng = np.random.default_rng(11)
    a, b = 50.0, 0.05
    loss = a * COMPUTE ** (-b) * np.exp(rng.normal(0.0, 0.01, COMPUTE.size))
    fit = fit_power_law(COMPUTE, loss, names=[f"r{i}" for i in range(7)], seed=0)
    slope, intercept = np.polyfit(np.log(COMPUTE), np.log(loss), 1)
    assert fit.b == pytest.approx(-slope, rel=1e-10)
    assert fit.a == pytest.approx(np.exp(intercept), rel=1e-8)
    reference_fit = np.exp(intercept) * COMPUTE**slope
    assert fit.residuals_percent == pytest.approx(100 * (loss / reference_fit - 1), abs=1e-9)
    low, high = fit.b_interval
    assert low < b < high and low < fit.b < high
    assert 0 < high - low < 0.05
    summary = fit.summary()
    assert [p["name"] for p in summary["points"]] == [f"r{i}" for i in range(7)]
    assert summary["max_abs_residual_percent"] == pytest.approx(np.abs(fit.residuals_percent).max())
    band_low, band_high = fit.band(COMPUTE)
    assert np.all(band_low <= fit.predict(COMPUTE) + 1e-12)
    assert np.all(fit.predict(COMPUTE) <= band_high + 1e-12)


def test_bootstrap_is_seeded_and_widens_with_noise():
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 1.0, COMPUTE.size)
    clean = 10.0 * COMPUTE ** (-0.1)

    def width(sigma, seed=0):
        low, high = fit_power_law(COMPUTE, clean * np.exp(sigma * noise), seed=seed).b_interval
        return high - low

    assert width(0.02) == width(0.02)  # same seed, same interval
    assert width(0.02, seed=1) != width(0.02, seed=0)
    assert width(0.005) < width(0.02) < width(0.08)


def test_known_irreducible_loss_is_subtracted():
    floor, a, b = 1.7, 40.0, 0.3
    x = np.geomspace(1e6, 1e9, 5)
    loss = floor + a * x ** (-b)
    fit = fit_power_law(x, loss, irreducible=floor)
    assert fit.b == pytest.approx(b, rel=1e-10) and fit.a == pytest.approx(a, rel=1e-8)
    assert fit.predict(x) == pytest.approx(loss, rel=1e-12)
    assert fit_power_law(x, loss).b < 0.5 * b  # the floor flattens a plain power law


def test_two_points_fit_without_an_interval():
    fit = fit_power_law([1e3, 1e4], [2.0, 1.0])
    assert fit.b == pytest.approx(np.log10(2.0))
    assert fit.b_interval is None and fit.band([1e3]) is None
    assert fit.summary()["b_interval"] is None


@pytest.mark.parametrize(
    "x, loss, kwargs, message",
    [
        ([1e3, 1e3, 1e3], [2.0, 1.9, 2.1], {}, "at least 2 distinct x"),
        ([1e3], [2.0], {}, "at least 2 distinct x"),
        ([0.0, 1e3], [2.0, 1.0], {}, "x must be positive"),
        ([1e3, 1e4], [2.0, float("nan")], {}, "finite"),
        ([1e3, 1e4], [2.0, 1.0, 0.5], {}, "equal length"),
        ([1e3, 1e4], [2.0, 1.0], {"irreducible": 1.0}, "exceed the irreducible loss 1"),
        ([1e3, 1e4], [2.0, 1.0], {"confidence": 1.0}, "confidence=1.0"),
        ([1e3, 1e4], [2.0, 1.0], {"num_resamples": -1}, "num_resamples=-1"),
    ],
)
def test_bad_inputs_are_refused(x, loss, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(x, loss, **kwargs)
