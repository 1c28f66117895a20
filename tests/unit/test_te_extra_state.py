"""Transformer Engine's pickled ``_extra_state`` is checked before TE unpickles it.

TE's ``set_extra_state`` runs ``pickle.loads`` on the bytes of a checkpoint's
``_extra_state`` tensor. ``check_extra_state`` unpickles them first with an allowlist;
these tests hold it to what TE writes (a dict of CPU tensors and the recipe, built here as
TE's ``get_extra_state`` builds it) and to what an attacker would write."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from mm1_megatron.compat.safe_pickle import CheckpointFileError, UnsafePickleError
from mm1_megatron.compat.te_extra_state import check_extra_state


def _as_extra_state(obj) -> torch.Tensor:
    """What TE's ``get_extra_state`` returns: ``pickle.dumps`` as a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_te_s_own_fp8_metadata_passes():
    state = {
        "scale_fwd": torch.ones(3),
        "amax_history_fwd": torch.zeros(16, 3),
        "scale_bwd": torch.ones(2),
        "amax_history_bwd": torch.zeros(16, 2),
        "extra_fp8_variables": {"num_gemms": 1, "fp8_max_fwd": 448.0},
    }
    check_extra_state(_as_extra_state(state), source="ckpt: linear_qkv._extra_state")


@pytest.mark.parametrize("value", [None, torch.empty(0, dtype=torch.uint8)])
def test_no_fp8_state_passes(value):
    check_extra_state(value, source="ckpt: x._extra_state")


def test_a_payload_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    payload = _as_extra_state({"recipe": _RunsCode(marker), "scale_fwd": torch.ones(1)})
    with pytest.raises(UnsafePickleError, match=r"ckpt: layers.0.mlp.linear_fc1._extra_state"):
        check_extra_state(payload, source="ckpt: layers.0.mlp.linear_fc1._extra_state")
    assert not marker.exists()
    pickle.loads(payload.numpy().tobytes())  # what TE would have done
    assert marker.exists()  # (the test's payload really is hostile)


def test_a_hostile_nested_tensor_storage_is_refused(tmp_path):
    """Tensors pickle their storage as a nested torch.save payload, which torch itself
    would read with ``weights_only=False``: that payload is checked too."""
    marker = tmp_path / "ran"
    nested = pickle.dumps(_RunsCode(marker))
    import torch.storage as storage_module

    class _Forged:
        def __reduce__(self):
            return (storage_module._load_from_bytes, (nested,))

    with pytest.raises(CheckpointFileError):
        check_extra_state(_as_extra_state({"scale_fwd": _Forged()}), source="ckpt: a")
    assert not marker.exists()


@pytest.mark.parametrize(
    "value, match",
    [
        (torch.ones(3), "uint8 tensor"),
        ("text", "uint8 tensor"),
        (torch.tensor([1, 2, 3], dtype=torch.uint8), "not a readable"),
    ],
)
def test_other_values_are_refused_readably(value, match):
    with pytest.raises(CheckpointFileError, match=match):
        check_extra_state(value, source="ckpt: a._extra_state")


def test_per_expert_extra_states_are_checked_too(tmp_path):
    """megatron-core's TE grouped linear loads ``_extra_state1`` ... ``_extra_stateN`` and
    unpickles each in a load hook: the loader checks them as it checks ``_extra_state``."""
    from mm1_megatron.checkpoint.loading import load_module_state

    marker = tmp_path / "ran"
    module = torch.nn.Linear(2, 2)
    state = {**module.state_dict(), "_extra_state1": _as_extra_state(_RunsCode(marker))}
    with pytest.raises(ValueError, match=r"ckpt: _extra_state1: refused to unpickle"):
        load_module_state(module, state, tmp_path / "ckpt")
    assert not marker.exists()
