"""Per-rank RNG states, stored as tensors and plain numbers so ``weights_only`` loads them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from megatron.core import tensor_parallel

from mm1_megatron.compat.safe_pickle import load_weights_only


def capture_rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_position": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gauss": float(np_state[4]),
        "torch_cpu": torch.get_rng_state(),
        # Named streams of Megatron's tensor-parallel RNG tracker (dropout in TP regions).
        "tracker": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    keys, gauss_next = state["python"]
    random.setstate((state["python_version"], tuple(keys), gauss_next))
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_position"],
            state["numpy_has_gauss"],
            state["numpy_cached_gauss"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def save_rng_state(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng_state(), path)


def load_rng_state(path: Path) -> None:
    """Restore the RNG states saved in ``path``; a damaged or refused file raises
    ``ValueError`` naming it."""
    state = load_weights_only(path, source=str(path), what="RNG state file")
    try:
        restore_rng_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ValueError(f"{path} does not hold the RNG states this run needs: {exc}") from None
