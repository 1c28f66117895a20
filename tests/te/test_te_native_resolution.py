"""The native-resolution ViT on Transformer Engine layers: the packed images go through
``TEDocumentAttention`` (THD with ``cu_seqlens``; Megatron-Core turns the ViT's
``no_mask`` into ``padding``) and still never attend to each other."""

from __future__ import annotations

import pytest

from tests.te.conftest import SKIP_REASON, TE_MODE

if TE_MODE is None:  # before the Megatron-Core imports: the skip costs nothing
    pytest.skip(SKIP_REASON, allow_module_level=True)

import torch  # noqa: E402

from mm1_megatron.models import RuntimeOptions  # noqa: E402
from mm1_megatron.models.transformer_configs import vision_transformer_config  # noqa: E402
from mm1_megatron.models.vision_encoder import VisionEncoder  # noqa: E402
from tests.conftest import make_tiny_config  # noqa: E402
from tests.unit.test_native_resolution import GRIDS, NATIVE, _images, _pack  # noqa: E402


def test_te_native_vit_keeps_each_image_to_itself(seeded, te_overrides, te_mode):
    device = torch.device("cuda" if te_mode == "real" else "cpu")
    cfg = make_tiny_config(*te_overrides, *NATIVE)
    config = vision_transformer_config(cfg.model, cfg.parallel, RuntimeOptions())
    encoder = VisionEncoder(config, cfg.model.vision, transformer_impl="transformer_engine")
    encoder = encoder.to(device).eval()
    attention = encoder.transformer.layers[0].self_attention.core_attention
    assert type(attention).__name__ == "TEDocumentAttention"
    images = _images()
    changed = [image.clone() for image in images]
    changed[0] += 1.0
    counts = [h * w for h, w in GRIDS]
    with torch.no_grad():
        packed = encoder.encode_packed(_pack(images).to(device), GRIDS).split(counts)
        moved = encoder.encode_packed(_pack(changed).to(device), GRIDS).split(counts)
        for image, grid, features in zip(images, GRIDS, packed):
            alone = encoder.encode_packed(_pack([image]).to(device), [grid])
            torch.testing.assert_close(features, alone, rtol=1e-4, atol=1e-4)
    assert not torch.equal(packed[0], moved[0])
    assert all(torch.equal(a, b) for a, b in zip(packed[1:], moved[1:]))
