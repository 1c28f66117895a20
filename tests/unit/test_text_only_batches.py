"""Micro-batches without images: the vision tower is skipped and gets zero gradient,
including inside Megatron-Core DDP with gradient accumulation over an image batch."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from mm1_megatron.data import build_data


def _batch(cfg, mixture):
    cfg.data.mixture = mixture
    v = cfg.model.vision
    loader, _ = build_data(
        cfg.data,
        seq_length=cfg.training.seq_length,
        micro_batch_size=2,
        num_image_tokens=cfg.model.connector.num_output_tokens,
        image_size=v.image_size,
        image_mean=v.image_mean,
        image_std=v.image_std,
        seed=7,
        dp_rank=0,
        dp_size=1,
    )
    batch = next(loader)
    return batch


def _loss(model, batch):
    per_token = model(
        batch["tokens"],
        batch["position_ids"],
        batch["document_ids"],
        images=batch["images"],
        labels=batch["labels"],
    )
    return (per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def _vision_grads(model):
    inner = model.module if hasattr(model, "module") else model
    params = list(inner.vision_encoder.parameters()) + list(inner.connector.parameters())
    return [p.main_grad if hasattr(p, "main_grad") else p.grad for p in params]


def test_text_only_batch_gives_vision_exactly_zero_gradient(tiny_config, build_tiny_model):
    """No image is encoded, yet every encoder and connector parameter takes part in the
    backward pass (with a zero gradient): overlapped gradient reduction needs every
    parameter's gradient hook to fire in each step."""
    cfg = tiny_config()
    model = build_tiny_model(cfg)
    text = _batch(cfg, {"text": 1.0})
    assert text["images"].shape[0] == 0
    _loss(model, text).backward()
    grads = _vision_grads(model)
    assert all(g is not None and not g.any() for g in grads)
    assert model.language_model.decoder.layers[0].mlp.linear_fc1.weight.grad is not None


def test_ddp_accumulation_of_text_then_image_batch_equals_image_batch_alone(
    tiny_config, build_tiny_model
):
    cfg = tiny_config()
    images = _batch(cfg, {"caption": 1.0})
    text = _batch(cfg, {"text": 1.0})
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True)

    def accumulated_vision_grads(batches):
        model = build_tiny_model(cfg, seed=99)
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        ddp.zero_grad_buffer()
        for batch in batches:
            _loss(ddp, batch).backward()
        ddp.finish_grad_sync()
        return [g.clone() for g in _vision_grads(ddp)]

    text_then_images = accumulated_vision_grads([text, images])
    images_only = accumulated_vision_grads([images])
    assert any(g.abs().sum() > 0 for g in images_only)
    for got, expected in zip(text_then_images, images_only):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
