"""Native-resolution micro-batches through ``MM1Model``: real loader batches (packed
patches of several aspect ratios, host grids) encode image by image, train, and reach the
model by the same path as every batch; mismatched inputs are refused."""

from __future__ import annotations

import pytest
import torch

from mm1_megatron.batch import model_inputs, run_model
from mm1_megatron.data.build import build_run_data
from tests.conftest import IMAGE_TOKEN_ID, NATIVE_OVERRIDES


@pytest.fixture
def native(tiny_config, build_tiny_model):
    cfg = tiny_config(
        *NATIVE_OVERRIDES, "training.seq_length=256", "model.llm.max_sequence_length=256"
    )
    loader, tokenizer = build_run_data(cfg)
    assert tokenizer.image_token_id == IMAGE_TOKEN_ID
    batch = next(b for b in loader if len(set(map(tuple, b["image_grids"].tolist()))) >= 3)
    return build_tiny_model(cfg), batch


def _image_tokens(model, patches, grids):
    with torch.no_grad():
        return model.encode_images(patches, grids)


def test_no_image_of_a_batch_attends_to_another(native):
    """Perturbing one image's pixels changes its tokens only: the others' stay bit for bit."""
    model, batch = native
    model.eval()
    patches, grids = batch["images"], batch["image_grids"]
    counts = grids.prod(dim=1).tolist()
    changed_image = 1
    start = sum(counts[:changed_image])
    perturbed = patches.clone()
    perturbed[start : start + counts[changed_image]] += torch.randn(counts[changed_image], 1)
    before = _image_tokens(model, patches, grids)
    after = _image_tokens(model, perturbed, grids)
    assert before.shape == (len(counts), 4, model.config.hidden_size)
    for index in range(len(counts)):
        same = torch.equal(before[index], after[index])
        assert same == (index != changed_image), index


def test_a_native_batch_trains_through_model_inputs_and_run_model(native):
    model, batch = native
    model.train()
    inputs = model_inputs(batch, torch.device("cpu"))
    assert inputs["image_grids"] is batch["image_grids"]  # read on the host, never moved
    per_token = run_model(model, inputs)
    assert per_token.shape == batch["tokens"].shape
    (per_token * batch["loss_mask"]).sum().backward()
    for name, param in model.vision_encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_stages_without_the_vision_encoder_get_neither_pixels_nor_grids(native):
    _, batch = native
    inputs = model_inputs(batch, torch.device("cpu"), images=False)
    assert "images" not in inputs and "image_grids" not in inputs
    assert "tokens" in inputs


def test_a_native_model_refuses_fixed_size_images(native):
    model, _ = native
    with pytest.raises(ValueError, match="native_resolution=true"):
        model.encode_images(torch.zeros(2, 3, 56, 56))


def test_a_fixed_size_model_refuses_grids(tiny_config, build_tiny_model):
    model = build_tiny_model(tiny_config())
    with pytest.raises(ValueError, match="native_resolution=false"):
        model.encode_images(torch.zeros(1, 3, 56, 56), torch.tensor([[4, 4]]))
