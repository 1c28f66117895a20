"""The CPU stand-ins for CUDA: devices, type strings, and Megatron's forked RNG stream."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.compat import cpu_execution_enabled, enable_cpu_execution

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU stand-ins are installed only without CUDA"
)


@pytest.fixture
def cpu_mode(megatron_single_process):
    assert enable_cpu_execution() is True
    assert cpu_execution_enabled()


def test_enable_is_idempotent(cpu_mode):
    assert enable_cpu_execution() is True
    assert torch.empty(1, device="cuda").device.type == "cpu"


@pytest.mark.parametrize(
    "device", ["cuda", "cuda:0", torch.device("cuda"), torch.device("cuda", 0), 0]
)
def test_cuda_device_arguments_become_cpu(cpu_mode, device):
    assert torch.empty(2, device=device).device == torch.device("cpu")
    assert torch.zeros(3, device=device).sum().item() == 0.0
    assert torch.ones(2, 2, device=device).device.type == "cpu"


def test_current_device_is_the_cpu(cpu_mode):
    # docs/cpu.md: current_device() returns the CPU device rather than the ordinal 0,
    # because backward passes run outside the function mode and use it as ``device=``.
    assert torch.cuda.current_device() == torch.device("cpu")
    t = torch.arange(4, device=torch.cuda.current_device())
    assert t.device.type == "cpu" and t.tolist() == [0, 1, 2, 3]


def test_current_device_works_inside_autograd_backward(cpu_mode):
    # Backward runs in autograd's engine, outside the TorchFunctionMode: a tensor made on
    # current_device() there must still land on the CPU.
    class MakesTensorInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * 2 + torch.zeros(grad.shape, device=torch.cuda.current_device())

    x = torch.ones(3, requires_grad=True)
    MakesTensorInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_cuda_method_returns_same_tensor(cpu_mode):
    t = torch.randn(3)
    assert t.cuda() is t
    assert t.cuda(0) is t


def test_to_cuda_stays_on_cpu(cpu_mode):
    t = torch.randn(3)
    assert t.to("cuda").device.type == "cpu"
    assert t.to(device="cuda").device.type == "cpu"
    moved = t.to("cuda", torch.float64)
    assert moved.device.type == "cpu" and moved.dtype == torch.float64
    assert torch.equal(moved, t.double())


def test_cpu_device_arguments_untouched(cpu_mode):
    assert torch.empty(1, device="cpu").device.type == "cpu"
    assert torch.empty(1, device="meta").device.type == "meta"


@pytest.mark.parametrize(
    "dtype, name",
    [
        (torch.float32, "torch.cuda.FloatTensor"),
        (torch.float16, "torch.cuda.HalfTensor"),
        (torch.bfloat16, "torch.cuda.BFloat16Tensor"),
    ],
)
def test_type_reports_cuda_tensor(cpu_mode, dtype, name):
    assert torch.zeros(2, dtype=dtype).type() == name
    assert torch.nn.Parameter(torch.zeros(2, dtype=dtype)).type() == name


def test_type_with_argument_still_converts(cpu_mode):
    t = torch.ones(2)
    converted = t.type(torch.float64)
    assert converted.dtype == torch.float64 and torch.equal(converted, t.double())


def test_cuda_stubs(cpu_mode):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == 0
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    assert event.query() is True
    with torch.cuda.stream(torch.cuda.Stream()):
        pass


def test_cuda_rng_state_is_the_cpu_generator(cpu_mode):
    torch.cuda.manual_seed(99)
    a = torch.rand(4)
    torch.default_generator.manual_seed(99)
    assert torch.equal(torch.rand(4), a)
    state = torch.cuda.get_rng_state()
    b = torch.rand(4)
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(4), b)


def test_rng_tracker_fork_switches_the_cpu_stream(cpu_mode, seeded):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    seeded(123)
    tracker = get_cuda_rng_tracker()
    start = torch.get_rng_state()

    # Reference: the outer stream with no fork at all.
    first, second = torch.rand(6), torch.rand(6)

    torch.set_rng_state(start)
    first_again = torch.rand(6)
    with tracker.fork():
        inside = torch.rand(6)
        inside_more = torch.rand(6)
    second_again = torch.rand(6)

    assert torch.equal(first_again, first)
    # The outer stream continues as if the fork never happened ...
    assert torch.equal(second_again, second)
    # ... and the forked stream is a different one.
    assert not torch.equal(inside, second)
    assert not torch.equal(inside, first)
    assert not torch.equal(inside_more, inside)

    # The forked stream keeps its own position across forks ...
    with tracker.fork():
        inside_next = torch.rand(6)
    assert not torch.equal(inside_next, inside)
    assert not torch.equal(inside_next, inside_more)

    # ... and replays identically after re-seeding.
    seeded(123)
    with tracker.fork():
        assert torch.equal(torch.rand(6), inside)
        assert torch.equal(torch.rand(6), inside_more)
        assert torch.equal(torch.rand(6), inside_next)


def test_rng_tracker_seed_dependence(cpu_mode, seeded):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    draws = []
    for seed in (1, 2):
        seeded(seed)
        with get_cuda_rng_tracker().fork():
            draws.append(torch.rand(5))
    assert not torch.equal(draws[0], draws[1])


def test_dropout_inside_fork_is_reproducible(cpu_mode, seeded):
    # Megatron runs attention dropout inside the fork: masks must repeat after reseeding.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    x = torch.ones(64)
    masks = []
    for _ in range(2):
        seeded(7)
        with get_cuda_rng_tracker().fork():
            masks.append(torch.nn.functional.dropout(x, p=0.5, training=True))
    assert torch.equal(masks[0], masks[1])
    assert 0 < (masks[0] == 0).sum() < 64
