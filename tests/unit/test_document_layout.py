"""One document layout (segments, ``cu_seqlens``) per micro-batch, shared by every layer of
the forward and of the recompute in backward, built from the host copy of the ids.

Counted two ways: spies on the two builders, and a dispatch mode that sees every copy
between devices. On CPU that count must be 0 (there is one device); on a GPU the same
test counts the host <-> device transfers inside the forward and backward, which must
be 0 too: ``model_inputs`` moved the batch and the layout before the step began.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mm1_megatron.batch import documents, model_inputs, run_model
from mm1_megatron.data.build import build_run_data
from mm1_megatron.models.attention import document_segments
from tests.conftest import make_tiny_config

aten = torch.ops.aten
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS = 3


class CrossDeviceCopies(TorchDispatchMode):
    """Every op that moves data between devices: ``_to_copy`` (``.to``, ``.cpu()``),
    ``copy_`` across devices, and reading a device scalar on the host
    (``_local_scalar_dense``: ``.item()``, ``int(t)``). Each is an H2D or D2H transfer on a
    GPU, and a D2H one stalls the host until the device catches up.

    Blind spot: ``torch.tensor(data, device=...)`` copies below the dispatch keys that
    modes see (``test_the_counter_sees_the_copies_that_dispatch``), so the library builds
    device tensors with ``.to``."""

    def __init__(self):
        super().__init__()
        self.copies = []  # (op, source device type, destination device type)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.overloadpacket
        if op is aten._to_copy:
            source, destination = args[0].device, out.device
        elif op is aten.copy_ and isinstance(args[1], torch.Tensor):
            source, destination = args[1].device, args[0].device
        elif op is aten._local_scalar_dense:
            source, destination = args[0].device, torch.device("cpu")
        else:
            return out
        if source != destination:
            self.copies.append((str(op), source.type, destination.type))
        return out

    def count(self, source: str, destination: str) -> int:
        """``count("cpu", "cuda")``: the H2D copies; ``count("cuda", "cpu")``: D2H."""
        return sum(1 for _, s, d in self.copies if (s, d) == (source, destination))


def test_the_counter_sees_the_copies_that_dispatch():
    host = torch.arange(6).view(2, 3)
    with CrossDeviceCopies() as counter:
        host.to("meta", non_blocking=True)
        torch.empty(2, 3, dtype=host.dtype, device="meta").copy_(host)
        host.to(torch.int32)  # same device: not a transfer
    assert counter.count("cpu", "meta") == 2 and len(counter.copies) == 2
    with CrossDeviceCopies() as counter:
        torch.tensor([0, 2, 5], device="meta")
    assert counter.copies == []  # the blind spot the class docstring names


class _Spy:
    """Counts calls of ``module.name`` (patched for the test) and passes them on."""

    def __init__(self, monkeypatch, module, name):
        self.calls = 0
        original = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


def _step(model, host_batch):
    """``model_inputs`` + forward + backward of one micro-batch; returns the per-token loss,
    the parameter gradients and the transfers the forward and backward made."""
    model.zero_grad(set_to_none=True)
    inputs = model_inputs(host_batch, DEVICE)
    with CrossDeviceCopies() as counter:
        per_token = run_model(model, inputs)
        (per_token * inputs["loss_mask"]).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return per_token.detach(), grads, counter


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_one_layout_per_micro_batch_in_forward_and_recompute(
    build_tiny_model, monkeypatch, recompute
):
    overrides = (f"model.llm.num_layers={NUM_LAYERS}", "data.mixture={caption: 1.0}")
    cfg = make_tiny_config(*overrides, f"parallel.recompute={recompute}")
    reference_cfg = make_tiny_config(*overrides, "model.attention=dense_mask_reference")
    model = build_tiny_model(cfg).to(DEVICE)
    reference = build_tiny_model(reference_cfg).to(DEVICE)
    loader, _ = build_run_data(cfg, seed=0)
    segments = _Spy(monkeypatch, documents, "compute_segments")
    bounds = _Spy(monkeypatch, documents, "build_cu_seqlens")
    for _ in range(2):
        host_batch = next(loader)
        assert int(host_batch["document_ids"].max()) >= 1  # several packed documents
        before = segments.calls, bounds.calls
        per_token, grads, counter = _step(model, host_batch)
        built = segments.calls - before[0], bounds.calls - before[1]
        assert built == (1, 1), f"{built} (segments, cu_seqlens) builds for one micro-batch"
        assert counter.copies == [], counter.copies
        expected_per_token, expected_grads, _ = _step(reference, host_batch)
        torch.testing.assert_close(per_token, expected_per_token, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_ids_moved_by_model_inputs_are_never_read_back():
    """``meta`` stands in for a device that cannot be read: ``.cpu()`` on it raises, so the
    layout must come from the host copy that ``model_inputs`` registered."""
    host_batch = {"document_ids": torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0]])}
    inputs = model_inputs(host_batch, torch.device("meta"))
    with CrossDeviceCopies() as counter:
        layout = documents.document_layout(inputs["document_ids"])
        again = document_segments(inputs["document_ids"].detach())  # recompute's copy
    assert counter.copies == []
    assert layout.segments == again == [[(0, 2), (2, 5), (5, 6)], [(0, 6)]]
    assert layout.cu_seqlens.device.type == "meta" and layout.max_seqlen == 6


def test_detached_views_share_a_layout_and_in_place_changes_do_not():
    ids = torch.tensor([[0, 0, 1, 1]])
    layout = documents.document_layout(ids)
    assert documents.document_layout(ids.detach()) is layout
    assert documents.document_layout(ids.detach().detach()) is layout
    ids[0, 1] = 1  # bumps the version counter the detached views share
    assert documents.document_layout(ids).segments == [[(0, 1), (1, 4)]]


def test_new_ids_at_a_recycled_address_get_their_own_layout():
    """Two micro-batches at the same address, shape, strides and version (a numpy buffer
    rewritten behind torch's back, as a loader's reused buffer could be): the second must
    not get the first's layout, whether it is looked up (not registered: generation) or
    registered by ``model_inputs``."""
    buffer = np.array([[0, 0, 0, 1, 1, 1]])
    first = model_inputs({"document_ids": torch.from_numpy(buffer)}, torch.device("cpu"))
    assert document_segments(first["document_ids"]) == [[(0, 3), (3, 6)]]
    buffer[0] = [0, 1, 1, 1, 1, 2]
    second = torch.from_numpy(buffer)
    assert second.data_ptr() == first["document_ids"].data_ptr()
    assert second._version == first["document_ids"]._version
    assert document_segments(second) == [[(0, 1), (1, 5), (5, 6)]]
    buffer[0] = [0, 0, 1, 1, 2, 2]
    third = model_inputs({"document_ids": torch.from_numpy(buffer)}, torch.device("cpu"))
    assert third["document_ids"].data_ptr() == first["document_ids"].data_ptr()
    assert document_segments(third["document_ids"]) == [[(0, 2), (2, 4), (4, 6)]]


def test_the_cache_keeps_the_micro_batches_a_pipeline_has_in_flight(monkeypatch):
    """1F1B on the first of ``p`` stages runs ``p`` forwards before the first backward:
    every one of them must still be cached (held, so no new ids can take their address)
    when its backward recomputes, and the oldest beyond the bound are let go."""
    segments = _Spy(monkeypatch, documents, "compute_segments")
    in_flight = [torch.tensor([[0] * k + [1] * (8 - k)]) for k in range(documents.MAX_LAYOUTS)]
    layouts = [documents.register_host_document_ids(ids, ids) for ids in in_flight]
    held = weakref.ref(in_flight[0])
    assert segments.calls == documents.MAX_LAYOUTS
    for ids, layout in zip(in_flight, layouts):  # the backwards, oldest first
        assert documents.document_layout(ids.detach()) is layout
    assert segments.calls == documents.MAX_LAYOUTS
    del in_flight, layouts
    gc.collect()
    assert held() is not None  # the cache holds the ids: their storage cannot be reused
    for _ in range(documents.MAX_LAYOUTS):
        documents.document_layout(torch.tensor([[0, 1]]))
    gc.collect()
    assert held() is None  # bounded: evicted after MAX_LAYOUTS newer micro-batches
