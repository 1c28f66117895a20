"""Our collectives run on their process group's device (the first GPU run crashed on a
CPU tensor broadcast over NCCL), and nothing in the library bypasses that check."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mm1_megatron.parallel import collectives

REPO_ROOT = Path(__file__).resolve().parents[2]
COLLECTIVE_NAMES = {
    "all_reduce",
    "broadcast",
    "barrier",
    "all_gather",
    "all_gather_object",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "gather",
    "scatter",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "monitored_barrier",
}


def test_nccl_groups_take_cuda_tensors_and_gloo_groups_cpu(megatron_single_process, monkeypatch):
    assert collectives.group_device() == torch.device("cpu")  # this world is gloo
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.group_device() == torch.device("cuda", 3)


def test_a_tensor_on_another_device_is_refused(megatron_single_process, monkeypatch):
    # A gloo group given a tensor that lives elsewhere (meta stands in for any other
    # device here) ...
    with pytest.raises(ValueError, match="tensor on meta; it must be on cpu"):
        collectives.all_reduce_(torch.zeros(2, device="meta"))
    # ... and an NCCL group given a CPU tensor: the start-up crash of the first GPU run.
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ValueError, match="nccl group got a tensor on cpu"):
        collectives.all_reduce_(torch.zeros(2))


def test_value_helpers_build_their_tensors_on_the_group_device(
    megatron_single_process, monkeypatch
):
    seen = []

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.device)

    monkeypatch.setattr(dist, "all_reduce", spy)
    monkeypatch.setattr(dist, "broadcast", spy)
    monkeypatch.setattr(collectives, "group_device", lambda group=None: torch.device("meta"))
    for call in (
        lambda: collectives.all_reduce_values([1.0, 2.0]),
        lambda: collectives.broadcast_int(7),
    ):
        with pytest.raises((NotImplementedError, RuntimeError)):  # meta holds no values
            call()
    assert seen == [torch.device("meta"), torch.device("meta")]


def test_helpers_compute_in_a_world_of_one(megatron_single_process):
    assert collectives.all_reduce_values([1.5, 2.0]) == [1.5, 2.0]
    assert collectives.all_reduce_values([3.0], op="max") == [3.0]
    assert collectives.broadcast_int(42) == 42
    collectives.barrier()


def _direct_collective_calls(path: Path) -> list:
    tree = ast.parse(path.read_text())
    calls = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in COLLECTIVE_NAMES
        ):
            owner = ast.unparse(node.func.value)
            if owner in ("dist", "torch.distributed"):
                calls.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return calls


def test_every_collective_of_ours_goes_through_the_checked_helpers():
    allowed = {REPO_ROOT / "mm1_megatron" / "parallel" / "collectives.py"}
    compat = REPO_ROOT / "mm1_megatron" / "compat"
    files = [
        path
        for folder in ("mm1_megatron", "tools")
        for path in (REPO_ROOT / folder).rglob("*.py")
        if path not in allowed and compat not in path.parents
    ]
    offenders = [call for path in files for call in _direct_collective_calls(path)]
    assert offenders == []
    assert _direct_collective_calls(allowed.pop())  # the checker sees real calls
