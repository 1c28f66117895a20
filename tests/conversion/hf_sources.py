"""Tiny random ``transformers`` models (built locally from configs, nothing downloaded).

Weights are redrawn larger than the ``transformers`` initialisation (matrices N(0, 0.1),
norm scales U(0.5, 1.5), biases N(0, 0.1)) so that a wrong layout moves the outputs by
far more than the 1e-4 parity tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
HIDDEN = 64
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
VISION = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)
IMAGE_SIZE = VISION["image_size"]


def _configs():
    from transformers import (
        CLIPConfig,
        CLIPVisionConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
        SiglipVisionConfig,
    )

    return {
        "llama": LlamaConfig(**TEXT, rope_theta=500000.0, rms_norm_eps=1e-5),
        "qwen2": Qwen2Config(**TEXT, tie_word_embeddings=True, rope_theta=1000000.0),
        "mistral": MistralConfig(**TEXT, sliding_window=4096),
        "mixtral": MixtralConfig(
            **{**TEXT, "intermediate_size": 96}, num_local_experts=4, num_experts_per_tok=2
        ),
        # Qwen3: q/k norms and a head size of its own (4 heads of 24 in a 64-wide model).
        "qwen3": Qwen3Config(**TEXT, head_dim=24, tie_word_embeddings=True),
        # Qwen3-MoE: experts on layer 0, a dense layer 1 (mlp_only_layers), top-2 of 4
        # renormalised (norm_topk_prob), untied embeddings.
        "qwen3_moe": Qwen3MoeConfig(
            **TEXT,
            head_dim=24,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            tie_word_embeddings=False,
        ),
        "clip_vision": CLIPVisionConfig(**VISION, hidden_act="quick_gelu"),
        # SigLIP's defaults: gelu_pytorch_tanh, layer_norm_eps 1e-6, the pooling head.
        "siglip_vision": SiglipVisionConfig(**VISION),
        "clip": CLIPConfig(
            vision_config={**VISION, "hidden_act": "gelu"},
            text_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=100,
                bos_token_id=0,
                eos_token_id=1,
            ),
        ),
    }


def randomize(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            else:
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)


def build_source(name: str, folder: Path, seed: int = 0):
    """Build the named model, save it to ``folder`` (safetensors), return it in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel, SiglipVisionModel

    config = _configs()[name]
    if name == "clip_vision":
        model = CLIPVisionModel(config)
    elif name == "siglip_vision":
        model = SiglipVisionModel(config)
    elif name == "clip":
        model = AutoModel.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return model.eval()


def vision_features(model, images: torch.Tensor) -> torch.Tensor:
    """What our ViT returns: ``last_hidden_state`` without CLIP's class token (SigLIP has
    none; its ``last_hidden_state`` is after the post-LayerNorm)."""
    tower = getattr(model, "vision_model", model)
    skip = 0 if "siglip" in tower.config.model_type else 1
    return tower(pixel_values=images).last_hidden_state[:, skip:]


def make_word_tokenizer(folder: Path, vocab_size: int = VOCAB) -> None:
    """A word-level HF tokenizer with bos/eos but no ``<image>`` or pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="w2"
    ).save_pretrained(str(folder))


# SigLIP 2 NaFlex: 4-px patches, a 4x4 position table, at most 32 patches per image.
SIGLIP2_VISION = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    patch_size=4,
    num_patches=16,
)
SIGLIP2_MAX_PATCHES = 32


def build_siglip2_source(name: str, folder: Path, seed: int = 0):
    """``siglip2_vision`` (``Siglip2VisionModel`` with a ``Siglip2ImageProcessor`` config
    of ``SIGLIP2_MAX_PATCHES``) or ``siglip2`` (``Siglip2Model``, no processor config),
    randomised and saved like ``build_source``; returns the vision tower in eval mode."""
    from transformers import (
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        Siglip2VisionConfig,
        Siglip2VisionModel,
    )

    if name == "siglip2_vision":
        model = Siglip2VisionModel(Siglip2VisionConfig(**SIGLIP2_VISION))
        processor = Siglip2ImageProcessor(patch_size=4, max_num_patches=SIGLIP2_MAX_PATCHES)
        processor.save_pretrained(str(folder))
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1)
        text.update(num_attention_heads=2, vocab_size=100, max_position_embeddings=16)
        text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = Siglip2Model(Siglip2Config(vision_config=SIGLIP2_VISION, text_config=text))
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return getattr(model, "vision_model", model).eval()


def siglip2_features(tower, patches, grid_sizes, max_patches: int = SIGLIP2_MAX_PATCHES):
    """``last_hidden_state`` of packed images run the Siglip2 way (each padded to
    ``max_patches`` rows, with its mask and spatial shape), unpadded and packed again."""
    import torch

    counts = [h * w for h, w in grid_sizes]
    pixel_values = torch.zeros(len(counts), max_patches, patches.shape[1])
    mask = torch.zeros(len(counts), max_patches, dtype=torch.int32)
    for index, image in enumerate(patches.split(counts)):
        pixel_values[index, : len(image)] = image
        mask[index, : len(image)] = 1
    with torch.no_grad():
        hidden = tower(
            pixel_values=pixel_values,
            pixel_attention_mask=mask,
            spatial_shapes=torch.tensor(grid_sizes),
        ).last_hidden_state
    return torch.cat([hidden[index, :count] for index, count in enumerate(counts)])
