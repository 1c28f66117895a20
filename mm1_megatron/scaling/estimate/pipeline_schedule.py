"""The exact time of Megatron-Core's non-interleaved 1F1B schedule for given per-stage,
per-micro-batch forward and backward times (``forward_backward_pipelining_without_interleaving``).

Stage ``s`` of ``P`` runs ``w = min(P - s - 1, M)`` warm-up forwards, then ``M - w``
rounds of one forward and one backward, then the ``w`` cool-down backwards:

    F0 .. F(w-1), F(w) B0, F(w+1) B1, .., F(M-1) B(M-w-1), B(M-w) .. B(M-1)

Each stage runs its operations one at a time in that order. ``F[s][k]`` starts once
``F[s-1][k]`` has finished and its activations have arrived (``send_seconds`` later);
``B[s][k]`` once ``B[s+1][k]`` has finished and its gradient has arrived (and after
``F[s][k]``, which the order guarantees). Sends are modelled as asynchronous, taking
``send_seconds`` each: Megatron-Core's combined send/receive calls
(``send_forward_recv_backward``) can also hold a sender until its neighbour is ready,
which this model leaves out.

The dependency graph depends only on ``(P, M)``: a topological order of it is computed
once per shape (cached) and each call is a single pass over the ``2 P M`` operations,
about 0.5 ms for ``P = 4, M = 128``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, Tuple

import numpy as np

# One operation of the plan: (node, previous node on the stage, node it waits for on the
# neighbouring stage, whether that wait includes a send). Nodes: F[s][k] is s * M + k,
# B[s][k] is P * M + s * M + k; 2 * P * M is a sentinel that finishes at time 0.
_Step = Tuple[int, int, int, bool]


def stage_order(stage: int, num_stages: int, num_microbatches: int) -> List[Tuple[str, int]]:
    """The operations of ``stage`` in the order it runs them: ``("F", k)`` / ``("B", k)``."""
    m = num_microbatches
    warmup = min(num_stages - stage - 1, m)
    order = [("F", k) for k in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    order += [("B", k) for k in range(m - warmup, m)]
    return order


@lru_cache(maxsize=256)
def _plan(num_stages: int, num_microbatches: int) -> Tuple[_Step, ...]:
    """Every operation with its two predecessors, in a topological order (Kahn's)."""
    p, m = num_stages, num_microbatches
    sentinel = 2 * p * m

    def node(kind: str, s: int, k: int) -> int:
        return (0 if kind == "F" else p * m) + s * m + k

    prev, dep, send = [sentinel] * sentinel, [sentinel] * sentinel, [False] * sentinel
    children: List[List[int]] = [[] for _ in range(sentinel)]
    for s in range(p):
        last = sentinel
        for kind, k in stage_order(s, p, m):
            n = node(kind, s, k)
            prev[n] = last
            if kind == "F" and s > 0:
                dep[n], send[n] = node("F", s - 1, k), True
            elif kind == "B" and s < p - 1:
                dep[n], send[n] = node("B", s + 1, k), True
            last = n
    waiting = [0] * sentinel
    for n in range(sentinel):
        for parent in (prev[n], dep[n]):
            if parent != sentinel:
                children[parent].append(n)
                waiting[n] += 1
    ready = [n for n in range(sentinel) if waiting[n] == 0]
    plan: List[_Step] = []
    while ready:
        n = ready.pop()
        plan.append((n, prev[n], dep[n], send[n]))
        for child in children[n]:
            waiting[child] -= 1
            if waiting[child] == 0:
                ready.append(child)
    if len(plan) != sentinel:  # a cycle: the schedule would deadlock (never, for 1F1B)
        raise RuntimeError(f"1F1B dependency cycle for P={p}, M={m}")
    return tuple(plan)


def simulate_1f1b(forward: np.ndarray, backward: np.ndarray, send_seconds: float = 0.0) -> float:
    """Seconds from the first forward to the last backward of 1F1B, where
    ``forward[s, k]`` / ``backward[s, k]`` are micro-batch ``k``'s seconds on stage ``s``
    (shape ``[P, M]``) and ``send_seconds`` is one point-to-point transfer."""
    forward = np.asarray(forward, dtype=float)
    backward = np.asarray(backward, dtype=float)
    if forward.ndim != 2 or forward.shape != backward.shape or forward.size == 0:
        raise ValueError(
            f"forward and backward must have the same [P, M] shape, got "
            f"{forward.shape} and {backward.shape}"
        )
    if (forward < 0).any() or (backward < 0).any() or send_seconds < 0:
        raise ValueError("operation and send times must be >= 0")
    p, m = forward.shape
    duration = forward.ravel().tolist() + backward.ravel().tolist()
    finish = [0.0] * (2 * p * m + 1)  # the last slot is the sentinel
    for n, before, waits_for, sends in _plan(p, m):
        start = finish[before]
        ready = finish[waits_for] + send_seconds if sends else finish[waits_for]
        if ready > start:
            start = ready
        finish[n] = start + duration[n]
    return finish[p * m + m - 1]  # B[0][M-1]: every other operation precedes it
