"""Save and exact resume when megatron-core runs a fused Adam (Transformer Engine's or
apex's ``FusedAdam``, the optimizer of every NGC container), shown with a stand-in that
keeps their contract: ``step`` per param group, only ``exp_avg`` / ``exp_avg_sq`` /
``master_param`` per parameter, and a ``state_dict()`` that looks each per-parameter
state up by name (TE raises ``KeyError: 'step'`` for a per-parameter step)."""

from __future__ import annotations

import math

import pytest
import torch

from mm1_megatron.checkpoint import layout
from mm1_megatron.config import load_config
from mm1_megatron.training.trainer import Trainer
from tests.checkpoint.test_faults import REPO


class FusedAdamStandIn(torch.optim.Optimizer):
    STATE_NAMES = ("exp_avg", "exp_avg_sq", "master_param")

    def __init__(
        self,
        params,
        lr=1e-3,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        eps=1e-8,
        adam_w_mode=True,
        capturable=False,
        **unused,
    ):
        assert adam_w_mode, "megatron-core asks for decoupled weight decay"
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group["params"]:
                continue
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(param.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                step = group["step"]
                denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
                param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))

    def state_dict(self):
        state_dict = super().state_dict()
        for per_param in state_dict["state"].values():
            for name in per_param:
                if name not in self.STATE_NAMES:  # TE: self.name_to_dtype_map[name]
                    raise KeyError(name)
        return state_dict


@pytest.fixture
def fused_adam(monkeypatch):
    """megatron-core as it is configured when Transformer Engine imports."""
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    monkeypatch.setattr(mcore_optimizer, "Adam", FusedAdamStandIn)
    monkeypatch.setattr(distrib_optimizer, "Adam", FusedAdamStandIn)
    monkeypatch.setattr(mcore_optimizer, "USING_PYTORCH_OPTIMIZER", False)
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    monkeypatch.setattr(distrib_optimizer, "USING_TE_OPTIMIZER", True)


def _trainer(tmp_path, name, *overrides):
    cfg = load_config(
        REPO / "configs/debug.yaml",
        [
            "training.train_steps=4",
            f"logging.output_dir={tmp_path / name}",
            "logging.tensorboard=false",
            *overrides,
        ],
    )
    return Trainer(cfg)


def test_fused_adam_checkpoint_resumes_exactly(megatron_single_process, fused_adam, tmp_path):
    ckpt = tmp_path / "ckpt"
    full = _trainer(tmp_path, "full", f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=2")
    inner = full.optimizer.chained_optimizers[0].optimizer
    assert isinstance(inner, FusedAdamStandIn)
    reference = [m["loss"] for m in full.train()]
    assert not any("step" in state for state in inner.state.values())

    resumed = _trainer(
        tmp_path, "resumed", f"checkpoint.load_dir={ckpt / layout.checkpoint_name(2)}"
    )
    assert resumed.step == 2
    losses = [m["loss"] for m in resumed.train()]
    assert all(math.isfinite(loss) for loss in losses)
    assert losses == reference[2:]
    groups = resumed.optimizer.chained_optimizers[0].optimizer.param_groups
    assert {group["step"] for group in groups if group["params"]} == {4}
