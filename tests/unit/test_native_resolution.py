"""The native-resolution (NaFlex) ViT: Siglip2's patch layout and position-table resize,
packed images that never attend to each other, and the config and input checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType

from mm1_megatron.batch.image_patches import image_ids, patchify
from mm1_megatron.models import RuntimeOptions
from mm1_megatron.models.attention import DocumentAttention, ImageDocumentAttention
from mm1_megatron.models.naflex import antialiased_bilinear_weights, resize_position_grid
from mm1_megatron.models.transformer_configs import vision_transformer_config
from mm1_megatron.models.vision_encoder import VisionEncoder
from tests.conftest import NATIVE_OVERRIDES, make_tiny_config

PATCH, GRID, HIDDEN = 14, 4, 32  # the tiny config: 56-px table images, a 4x4 table
NATIVE = (*NATIVE_OVERRIDES, "model.vision.max_patches=32", "model.vision.num_layers=2")
GRIDS = [(4, 4), (2, 8), (8, 2), (3, 5)]


@pytest.fixture
def encoder(megatron_single_process, seeded):
    cfg = make_tiny_config(*NATIVE)
    config = vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
    return VisionEncoder(config, cfg.model.vision).eval()


def _images(grids=GRIDS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h * PATCH, w * PATCH, generator=generator) for h, w in grids]


def _pack(images):
    return torch.cat([patchify(image, PATCH) for image in images])


def _split(features, grids=GRIDS):
    return features.split([h * w for h, w in grids])


# ---- inputs: Siglip2's patch layout, the position-table resize --------------------------


def test_patches_are_laid_out_as_siglip2_image_processor_does():
    from transformers import Siglip2ImageProcessor

    images = torch.randn(2, 3, 8, 12)
    batch = patchify(images, 4)
    assert batch.shape == (2, 6, 48)
    processor = Siglip2ImageProcessor(  # the torchvision or the PIL backend, as installed
        patch_size=4,
        max_num_patches=8,
        do_resize=False,
        do_rescale=False,
        do_normalize=False,
        do_convert_rgb=False,
    )
    theirs = processor(images=list(images.numpy()), return_tensors="pt")
    assert theirs["spatial_shapes"].tolist() == [[2, 3], [2, 3]]
    assert torch.equal(theirs["pixel_values"][:, :6], batch)


@pytest.mark.parametrize("size", [(4, 4), (2, 8), (8, 2), (3, 5), (1, 1), (7, 13)])
def test_position_table_resize_is_antialiased_bilinear(size):
    grid, hidden = 6, 5
    table = torch.randn(grid * grid, hidden)
    square = table.reshape(grid, grid, hidden).permute(2, 0, 1).unsqueeze(0)
    expected = F.interpolate(
        square, size=size, mode="bilinear", align_corners=False, antialias=True
    ).reshape(hidden, -1)
    torch.testing.assert_close(resize_position_grid(table, grid, size), expected.T)
    assert torch.allclose(antialiased_bilinear_weights(grid, size[0]).sum(1), torch.ones(1))


def test_resize_to_the_table_grid_returns_the_table():
    table = torch.randn(16, 8)
    assert resize_position_grid(table, 4, (4, 4)) is table


def test_image_ids_number_each_images_patches():
    assert image_ids([(1, 2), (2, 1), (1, 1)]).tolist() == [[0, 0, 1, 1, 2]]


# ---- packed images never see each other -------------------------------------------------


def test_no_image_attends_to_another(encoder):
    images = _images()
    changed = [image.clone() for image in images]
    changed[1] += torch.randn_like(changed[1])
    with torch.no_grad():
        before, after = (_split(encoder.encode_packed(_pack(x), GRIDS)) for x in (images, changed))
    for index, (a, b) in enumerate(zip(before, after)):
        assert torch.equal(a, b) != (index == 1), index  # only image 1 changes, bit for bit


def test_each_packed_image_computes_what_it_computes_alone(encoder):
    images = _images()
    with torch.no_grad():
        packed = _split(encoder.encode_packed(_pack(images), GRIDS))
        for image, grid, features in zip(images, GRIDS, packed):
            alone = encoder.encode_packed(patchify(image, PATCH), [grid])
            torch.testing.assert_close(features, alone, rtol=1e-5, atol=1e-5)


def test_attention_spans_the_whole_image(encoder):
    """Bidirectional within an image: the first patch sees a change in the last one."""
    images = _images()
    changed = [image.clone() for image in images]
    changed[2][:, -PATCH:, -PATCH:] += 1.0
    with torch.no_grad():
        before, after = (_split(encoder.encode_packed(_pack(x), GRIDS)) for x in (images, changed))
    assert (before[2] - after[2]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("grid", [(4, 4), (2, 6), (5, 3)])
def test_a_batch_of_equal_size_images_matches_packing_them(encoder, grid):
    images = _images([grid] * 3, seed=1)
    with torch.no_grad():
        batch = encoder(torch.stack(images))
        packed = encoder.encode_packed(_pack(images), [grid] * 3)
    assert batch.shape == (3, grid[0] * grid[1], HIDDEN)
    torch.testing.assert_close(batch.reshape(-1, HIDDEN), packed, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter_when_packed(encoder):
    encoder.train()
    out = encoder.encode_packed(_pack(_images()), GRIDS)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_parameters_have_siglip2_shapes(encoder):
    assert isinstance(encoder.patch_embedding, torch.nn.Linear)
    assert encoder.patch_embedding.weight.shape == (HIDDEN, 3 * PATCH * PATCH)
    assert encoder.position_embedding.shape == (GRID * GRID, HIDDEN)
    attention = encoder.transformer.layers[0].self_attention.core_attention
    assert type(attention) is ImageDocumentAttention


# ---- refused inputs and configs ---------------------------------------------------------


@pytest.mark.parametrize(
    "patches, grids, message",
    [
        (torch.zeros(15, 588), [(4, 4)], r"\[16, 588\]"),
        (torch.zeros(16, 500), [(4, 4)], r"\[16, 588\]"),
        (torch.zeros(36, 588), [(6, 6)], "max_patches=32"),
        (torch.zeros(4, 588), [(0, 4)], "positive"),
        (torch.zeros(4, 588), [], "one .rows, columns. pair"),
    ],
)
def test_bad_packed_inputs_raise(encoder, patches, grids, message):
    with pytest.raises(ValueError, match=message):
        encoder.encode_packed(patches, grids)


def test_an_image_over_the_patch_budget_raises(encoder):
    with pytest.raises(ValueError, match="max_patches"):
        encoder(torch.zeros(1, 3, 6 * PATCH, 6 * PATCH))


def test_fixed_resolution_encoder_refuses_packed_images(megatron_single_process, seeded):
    cfg = make_tiny_config()
    config = vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
    encoder = VisionEncoder(config, cfg.model.vision)
    with pytest.raises(ValueError, match="native_resolution=true"):
        encoder.encode_packed(torch.zeros(16, 588), [(4, 4)])


def test_native_resolution_needs_siglip_stem_and_a_budget():
    with pytest.raises(ValueError) as error:
        make_tiny_config("model.vision.native_resolution=true", "model.vision.max_patches=0")
    text = str(error.value)
    for fix in (
        "model.vision.use_class_token=false",
        "model.vision.patch_embedding_bias=true",
        "model.vision.pre_layernorm=false",
        "model.vision.post_layernorm=true",
        "model.vision.max_patches=0 must be > 0",
    ):
        assert fix in text, text


# ---- the attention ----------------------------------------------------------------------


def _core_attention(cls):
    cfg = make_tiny_config(*NATIVE)
    config = vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self")


def test_image_attention_is_block_diagonal_and_bidirectional(megatron_single_process):
    ids = image_ids([(1, 3), (2, 2), (1, 1)])  # 3, 4 and 1 patches
    seq, heads, dim = ids.shape[1], 2, 16
    q, k, v = (torch.randn(seq, 1, heads, dim) for _ in range(3))
    same_image = ids[0, :, None] == ids[0, None, :]
    expected = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=same_image
    )
    ours = _core_attention(ImageDocumentAttention)(q, k, v, ids)
    torch.testing.assert_close(ours, expected.permute(2, 0, 1, 3).reshape(seq, 1, -1))
    causal = _core_attention(DocumentAttention)(q, k, v, ids)  # the decoder's: unchanged
    assert not torch.allclose(causal, ours)
