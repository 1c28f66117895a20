"""Peak LR (MM1 rule or fixed), warmup + cosine schedule, per-module LR multipliers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from mm1_megatron.config import OptimizerConfig, load_config
from mm1_megatron.models.param_count import count_parameters
from mm1_megatron.training.lr import mm1_peak_lr, resolve_peak_lr
from mm1_megatron.training.optimizer import build_optimizer, build_scheduler

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def _non_embedding(name: str) -> int:
    return count_parameters(load_config(CONFIG_DIR / name).model).llm_active_non_embedding


# ---- the MM1 rule ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 1e6, 1.2e8, 3e9, 7e9, 3e10])
def test_mm1_rule_closed_form(n):
    n = int(n)
    # exp(-0.4214 ln N - 0.5535) == N ** -0.4214 * e ** -0.5535
    assert mm1_peak_lr(n) == pytest.approx(n**-0.4214 * math.e**-0.5535, rel=1e-12)


def test_mm1_rule_known_values():
    assert mm1_peak_lr(1) == pytest.approx(0.574934, rel=1e-5)  # exp(-0.5535)
    assert mm1_peak_lr(10**9) == pytest.approx(9.2687e-5, rel=1e-4)


def test_mm1_rule_halving_factor():
    # Scaling N by 2 scales the LR by 2 ** -0.4214 regardless of N.
    for n in (10**6, 10**9):
        assert mm1_peak_lr(2 * n) / mm1_peak_lr(n) == pytest.approx(2**-0.4214, rel=1e-12)


@pytest.mark.parametrize(
    "name, ballpark",
    [
        ("mm1_3b.yaml", 6e-5),
        ("mm1_7b.yaml", 4e-5),
        ("mm1_30b.yaml", 2e-5),
    ],
)
def test_mm1_rule_matches_published_ballparks(name, ballpark):
    lr = mm1_peak_lr(_non_embedding(name))
    assert lr == pytest.approx(ballpark, rel=0.15)


def test_mm1_rule_decreases_with_model_size():
    lrs = [mm1_peak_lr(_non_embedding(n)) for n in ("mm1_3b.yaml", "mm1_7b.yaml", "mm1_30b.yaml")]
    assert lrs[0] > lrs[1] > lrs[2]


@pytest.mark.parametrize("n", [0, -5])
def test_mm1_rule_rejects_non_positive(n):
    with pytest.raises(ValueError):
        mm1_peak_lr(n)


def test_moe_lr_uses_active_parameters():
    # MoE configs count only the top-k experts: their LR stays near the dense model's.
    dense = _non_embedding("mm1_3b.yaml")
    moe = count_parameters(load_config(CONFIG_DIR / "mm1_3b_moe.yaml").model)
    assert moe.llm_non_embedding > 10 * dense
    assert dense < moe.llm_active_non_embedding < 2 * dense


def test_resolve_peak_lr_fixed_and_mm1():
    assert resolve_peak_lr(OptimizerConfig(lr_rule="fixed", lr=0.003), 10**9) == 0.003
    assert resolve_peak_lr(OptimizerConfig(lr_rule="mm1"), 10**9) == pytest.approx(
        9.2687e-5, rel=1e-4
    )
    # With lr_rule=mm1 a stray lr value is ignored.
    assert resolve_peak_lr(OptimizerConfig(lr_rule="mm1", lr=1.0), 10**9) < 1e-3


# ---- optimizer + scheduler on a tiny model ---------------------------------------------


@pytest.fixture
def optimizer_for(build_tiny_model, tiny_config):
    """Build tiny model -> Megatron DDP -> optimizer -> scheduler, like Trainer does."""

    def _make(*overrides, peak_lr=0.01):
        cfg = tiny_config(*overrides)
        model = build_tiny_model(cfg)
        ddp = DistributedDataParallel(
            config=model.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
            ),
            module=model,
        )
        optimizer = build_optimizer(
            cfg.optimizer,
            [ddp],
            peak_lr=peak_lr,
            bf16=False,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        )
        scheduler = build_scheduler(
            cfg.optimizer, optimizer, peak_lr=peak_lr, train_steps=cfg.training.train_steps
        )
        return model, ddp, optimizer, scheduler

    return _make


def _expected_lr(step, *, peak, warmup, total, ratio):
    floor = peak * ratio
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if step >= total:
        return floor
    progress = (step - warmup) / (total - warmup)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def _group_lrs(optimizer):
    return [group["lr"] for group in optimizer.param_groups]


def test_schedule_warmup_then_cosine(optimizer_for):
    peak, warmup, total, ratio = 0.01, 4, 12, 0.1
    _, _, optimizer, scheduler = optimizer_for(
        f"optimizer.warmup_steps={warmup}",
        f"training.train_steps={total}",
        f"optimizer.min_lr_ratio={ratio}",
        peak_lr=peak,
    )
    seen = []
    for step in range(total + 3):
        if step:
            scheduler.step(increment=1)
        lrs = _group_lrs(optimizer)
        assert len(set(round(lr, 15) for lr in lrs)) == 1, lrs  # no multipliers: one LR
        seen.append(lrs[0])
        assert lrs[0] == pytest.approx(
            _expected_lr(step, peak=peak, warmup=warmup, total=total, ratio=ratio),
            rel=1e-9,
            abs=1e-15,
        ), step

    # The landmarks, spelled out.
    assert seen[0] == 0.0
    assert seen[2] == pytest.approx(0.005)  # halfway through warmup
    assert seen[warmup] == pytest.approx(peak)  # peak at the end of warmup
    assert seen[8] == pytest.approx((peak + peak * ratio) / 2)  # cosine midpoint
    assert seen[total] == pytest.approx(peak * ratio)  # floor at the last step
    assert seen[total + 2] == pytest.approx(peak * ratio)  # and after it
    # Linear warmup: equal increments.
    increments = [b - a for a, b in zip(seen[:warmup], seen[1 : warmup + 1])]
    assert increments == pytest.approx([peak / warmup] * warmup)
    # Monotone decay afterwards.
    assert all(b <= a + 1e-15 for a, b in zip(seen[warmup:], seen[warmup + 1 :]))


def test_schedule_without_warmup_starts_at_peak(optimizer_for):
    _, _, optimizer, scheduler = optimizer_for(
        "optimizer.warmup_steps=0", "training.train_steps=10", peak_lr=0.02
    )
    assert _group_lrs(optimizer)[0] == pytest.approx(0.02)
    for _ in range(10):
        scheduler.step(increment=1)
    assert _group_lrs(optimizer)[0] == pytest.approx(0.002)


def test_schedule_warmup_longer_than_training_is_clamped(optimizer_for):
    _, _, optimizer, scheduler = optimizer_for(
        "optimizer.warmup_steps=50", "training.train_steps=5", peak_lr=0.01
    )
    for step in range(1, 6):
        scheduler.step(increment=1)
        assert _group_lrs(optimizer)[0] == pytest.approx(0.01 * step / 5)


def test_multiplier_groups_follow_scaled_schedule(optimizer_for):
    peak, ratio = 0.01, 0.1
    _, _, optimizer, scheduler = optimizer_for(
        "optimizer.lr_multipliers.connector=2.0",
        "optimizer.warmup_steps=2",
        "training.train_steps=6",
        peak_lr=peak,
    )
    assert sorted({g["max_lr"] for g in optimizer.param_groups}) == pytest.approx([peak, 2 * peak])
    for step in range(1, 7):
        scheduler.step(increment=1)
        base = _expected_lr(step, peak=peak, warmup=2, total=6, ratio=ratio)
        for group in optimizer.param_groups:
            mult = group["max_lr"] / peak
            assert group["lr"] == pytest.approx(mult * base, rel=1e-9), (step, mult)


def _one_step_update(model, ddp, optimizer):
    """Per-parameter max |update| after one optimizer step on a multimodal batch."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, 256, (2, 12), generator=gen)
    tokens[:, 2:6] = 3  # one image of 4 connector tokens per row
    images = torch.randn(2, 3, 56, 56, generator=gen)
    labels = torch.randint(10, 256, (2, 12), generator=gen)
    documents = torch.zeros(2, 12, dtype=torch.long)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ddp(tokens, None, documents, images=images, labels=labels).sum().backward()
    ddp.finish_grad_sync()
    ok, _, _ = optimizer.step()
    assert ok
    return {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("distributed", ["true", "false"])
@pytest.mark.parametrize(
    "multipliers", [{"connector": 2.0}, {"vision_encoder": 0.5, "language_model": 3.0}]
)
def test_multiplier_scales_the_actual_update(optimizer_for, distributed, multipliers):
    # Adam's first step moves every weight by lr * g / (|g| + eps): about lr for any
    # weight with a non-tiny gradient. With no weight decay the largest move of each
    # parameter tensor therefore measures the LR that tensor really got.
    peak = 0.01
    overrides = [f"optimizer.lr_multipliers.{k}={v}" for k, v in multipliers.items()]
    model, ddp, optimizer, _ = optimizer_for(
        *overrides,
        "optimizer.warmup_steps=0",
        "optimizer.weight_decay=0.0",
        f"parallel.use_distributed_optimizer={distributed}",
        peak_lr=peak,
    )
    updates = _one_step_update(model, ddp, optimizer)
    for name, update in updates.items():
        module = name.split(".")[0]
        lr = peak * multipliers.get(module, 1.0)
        assert 0.95 * lr <= update <= lr * (1 + 1e-4), (name, update, lr)
