"""``simulate_1f1b``: the exact time of Megatron-Core's non-interleaved 1F1B schedule, on
cases worked by hand and closed forms, and how it relates to the step-time model's
``pipeline_seconds = (m - 1) x slowest + sum of stages``.

The relation, for micro-batches that are alike (stage ``s`` takes ``f_s`` forward and
``b_s`` backward, ``T_s = f_s + b_s``), with no send time:

- always ``max_j (M T_j + sum_{i<j} T_i) <= exact <= (M - 1)(max f + max b) + sum T``;
- so when one stage is the slowest both forward and backward (``b_s / f_s`` the same on
  every stage, as in the model's compute), ``exact <= pipeline_seconds``, short of it by
  at most the stages after the slowest (all of the fill and drain when stage 0, the
  vision stage, is the slowest); equal stages give equality;
- otherwise the closed form can be exceeded (by 11% in a random search).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from mm1_megatron.scaling.estimate.pipeline_schedule import simulate_1f1b, stage_order
from mm1_megatron.scaling.estimate.step_time import pipeline_seconds


def _uniform(f, b, m):
    f, b = np.asarray(f, dtype=float), np.asarray(b, dtype=float)
    return np.repeat(f[:, None], m, 1), np.repeat(b[:, None], m, 1)


def test_each_stage_runs_megatrons_order():
    assert stage_order(1, 4, 5) == [
        ("F", 0), ("F", 1),  # warm-up: P - s - 1 = 2
        ("F", 2), ("B", 0), ("F", 3), ("B", 1), ("F", 4), ("B", 2),  # 1F1B
        ("B", 3), ("B", 4),  # cool-down
    ]  # fmt: skip
    assert stage_order(3, 4, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert stage_order(0, 4, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]  # warm-up = M


def test_one_stage_is_the_sum_of_its_operations():
    rng = np.random.default_rng(0)
    forward, backward = rng.uniform(0, 1, (1, 7)), rng.uniform(0, 2, (1, 7))
    expected = forward.sum() + backward.sum()
    assert simulate_1f1b(forward, backward) == pytest.approx(expected, rel=1e-12)
    assert simulate_1f1b(forward, backward, send_seconds=5.0) == pytest.approx(expected)


@pytest.mark.parametrize("p, m", [(2, 1), (2, 8), (4, 3), (4, 16), (8, 64), (5, 5)])
def test_equal_stages_take_m_plus_p_minus_1_rounds(p, m):
    f, b = 0.3, 0.7
    forward, backward = _uniform([f] * p, [b] * p, m)
    assert simulate_1f1b(forward, backward) == pytest.approx((m + p - 1) * (f + b), rel=1e-12)
    assert pipeline_seconds([f + b] * p, m) == pytest.approx((m + p - 1) * (f + b), rel=1e-12)


def test_a_small_case_worked_by_hand():
    """P = 2, M = 3. Stage 0 runs F0 F1 B0 F2 B1 B2 (one warm-up forward), stage 1
    F0 B0 F1 B1 F2 B2. With f0 = [1, 2, 1], b0 = [2, 2, 3], f1 = [2, 1, 1], b1 = [1, 3, 2]:

        stage 0: F0 0-1   F1 1-3   B0 4-6 (waits for stage 1's B0)   F2 6-7
                 B1 8-10 (waits for B1)   B2 11-14 (waits for B2)
        stage 1: F0 1-3   B0 3-4   F1 4-5   B1 5-8   F2 8-9 (F2 arrived at 7)   B2 9-11

    14 s. With a send of 0.5 s on every hop:

        stage 0: F0 0-1   F1 1-3   B0 5-7 (4.5 + 0.5)   F2 7-8   B1 9-11 (8.5 + 0.5)
                 B2 12-15 (11.5 + 0.5)
        stage 1: F0 1.5-3.5   B0 3.5-4.5   F1 4.5-5.5   B1 5.5-8.5   F2 8.5-9.5   B2 9.5-11.5

    15 s."""
    forward = np.array([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]])
    backward = np.array([[2.0, 2.0, 3.0], [1.0, 3.0, 2.0]])
    assert simulate_1f1b(forward, backward) == 14.0
    assert simulate_1f1b(forward, backward, send_seconds=0.5) == 15.0


def test_longer_operations_never_shorten_the_schedule():
    rng = np.random.default_rng(1)
    forward, backward = rng.uniform(0.1, 1, (3, 5)), rng.uniform(0.1, 2, (3, 5))
    base = simulate_1f1b(forward, backward, 0.05)
    for which in (forward, backward):
        for index in np.ndindex(which.shape):
            for extra in (0.01, 0.5, 3.0):
                which[index] += extra
                longer = simulate_1f1b(forward, backward, 0.05)
                which[index] -= extra
                assert longer >= base - 1e-12
                assert longer <= base + extra + 1e-9  # one op delays the end by at most itself
    assert simulate_1f1b(forward, backward, 0.1) >= base


def _bounds(f, b, m):
    t = f + b
    lower = max(m * t[j] + t[:j].sum() for j in range(len(t)))
    upper = (m - 1) * (f.max() + b.max()) + t.sum()
    return lower, upper


def test_against_the_closed_form_for_alike_micro_batches():
    rng = np.random.default_rng(2)
    for _ in range(500):
        p, m = int(rng.integers(1, 9)), int(rng.integers(1, 40))
        f = rng.uniform(0.01, 3, p)
        for b in (rng.uniform(0.1, 5) * f, rng.uniform(0.01, 3, p)):
            exact = simulate_1f1b(*_uniform(f, b, m))
            lower, upper = _bounds(f, b, m)
            assert lower - 1e-9 <= exact <= upper + 1e-9
            if np.argmax(f) == np.argmax(b):  # the slowest stage is slowest both ways
                assert exact <= pipeline_seconds(list(f + b), m) + 1e-9
                assert upper == pytest.approx(pipeline_seconds(list(f + b), m))
    # Equal to the closed form when the slowest stage is the last: it waits for nothing.
    f, b = np.array([1.0, 1.0, 2.0]), np.array([2.0, 2.0, 4.0])
    assert simulate_1f1b(*_uniform(f, b, 10)) == pytest.approx(pipeline_seconds(f + b, 10))
    # Stage 0 the slowest: fill and drain mostly hide behind its own work.
    f, b = np.array([2.0, 1.0, 1.0]), np.array([4.0, 2.0, 2.0])
    assert simulate_1f1b(*_uniform(f, b, 10)) < pipeline_seconds(f + b, 10) - 3
    # Slowest forward on one stage, slowest backward on another: above the closed form.
    f, b = np.array([3.0, 0.1]), np.array([0.1, 3.0])
    assert simulate_1f1b(*_uniform(f, b, 10)) > pipeline_seconds(f + b, 10)


def test_sends_stay_within_the_closed_form_that_charges_them_per_stage():
    """``step_time`` adds one micro-batch's activations + gradients (2 sends) to every
    stage's time; the simulation puts one send on every hop of each direction."""
    rng = np.random.default_rng(3)
    for _ in range(300):
        p, m = int(rng.integers(2, 9)), int(rng.integers(1, 40))
        f = rng.uniform(0.01, 3, p)
        b, send = rng.uniform(0.1, 5) * f, float(rng.uniform(0, 1))
        exact = simulate_1f1b(*_uniform(f, b, m), send_seconds=send)
        assert exact <= pipeline_seconds(list(f + b + 2 * send), m) + 1e-9


def test_refuses_bad_shapes_and_negative_times():
    with pytest.raises(ValueError):
        simulate_1f1b(np.ones((2, 3)), np.ones((3, 2)))
    with pytest.raises(ValueError):
        simulate_1f1b(np.ones(3), np.ones(3))
    with pytest.raises(ValueError):
        simulate_1f1b(-np.ones((2, 3)), np.ones((2, 3)))


def test_fast_enough_to_call_thousands_of_times():
    """Measured about 0.1 ms for P = 4, M = 128; the bound leaves room for a busy CI."""
    rng = np.random.default_rng(4)
    forward = rng.uniform(0.5, 1, (4, 128))
    backward = 2 * forward
    simulate_1f1b(forward, backward)  # the plan for (4, 128) is cached after this
    start = time.perf_counter()
    for _ in range(20):
        simulate_1f1b(forward, backward, 0.01)
    assert (time.perf_counter() - start) / 20 < 0.005
