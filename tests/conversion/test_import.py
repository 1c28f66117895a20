"""Import parity: our model loaded from an imported checkpoint computes what the
``transformers`` source computes (fp32, max abs difference <= 1e-4), at TP=1 in this
process and at TP=2 / TP=2+SP / EP=2 in torchrun workers that load the checkpoint the way
training does (``checkpoint.pretrained_language_model`` / ``pretrained_vision_encoder``)."""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conversion.conftest import (
    LANGUAGE_SOURCES,
    LAYOUT_LOADS,
    TOLERANCE,
    VISION_SOURCES,
)
from tests.conversion.hf_sources import vision_features

logger = logging.getLogger(__name__)


def _load_tp1(folder, part):
    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import megatron_io

    step = megatron_io.resolve_step_folder(folder)
    cfg = load_config(step / "config.yaml")
    model = megatron_io.build_tp1_model(
        megatron_io.placeholder_model_config(cfg.model, [part]), image_token_id=0, seed=99
    )
    megatron_io.load_parts(model, step, [part])
    return model, cfg


def our_logits(model, tokens):

    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, torch.zeros_like(tokens))


def _reference(sources, name, inputs):
    model = sources[name][0]
    with torch.no_grad():
        if name in VISION_SOURCES:
            return vision_features(model, inputs["images"])
        return model(inputs["tokens"]).logits


@pytest.mark.parametrize("name", LANGUAGE_SOURCES)
def test_language_model_parity_tp1(name, sources, imported, inputs):
    model, _ = _load_tp1(imported[name], "language_model")
    diff = our_logits(model, inputs[0]["tokens"]) - _reference(sources, name, inputs[0])
    logger.info("%s TP=1 logits max abs diff %.3g", name, diff.abs().max())
    assert diff.abs().max() <= TOLERANCE


@pytest.mark.parametrize("name", VISION_SOURCES)
def test_vision_encoder_parity_tp1(name, sources, imported, inputs):
    model, _ = _load_tp1(imported[name], "vision_encoder")
    with torch.no_grad():
        ours = model.vision_encoder(inputs[0]["images"])
    diff = ours - _reference(sources, name, inputs[0])
    logger.info("%s TP=1 features max abs diff %.3g", name, diff.abs().max())
    assert diff.abs().max() <= TOLERANCE


@pytest.mark.parametrize("load", sorted(LAYOUT_LOADS))
def test_parity_when_training_loads_at_another_layout(load, sources, inputs, worker_outputs):
    from safetensors.torch import load_file

    source = LAYOUT_LOADS[load][0]
    ours = load_file(str(worker_outputs / f"{load}.safetensors"))["output"]
    diff = ours - _reference(sources, source, inputs[0])
    logger.info("%s max abs diff %.3g", load, diff.abs().max())
    assert diff.abs().max() <= TOLERANCE


def test_config_fields_map_from_hugging_face(imported):
    from mm1_megatron.config import load_config

    llama = load_config(imported["llama"] / "step_00000000" / "config.yaml").model.llm
    assert (llama.rotary_base, llama.norm_epsilon, llama.num_query_groups) == (500000, 1e-5, 2)
    assert not llama.tie_embeddings and not llama.qkv_bias
    qwen2 = load_config(imported["qwen2"] / "step_00000000" / "config.yaml").model.llm
    assert qwen2.tie_embeddings and qwen2.qkv_bias and qwen2.rotary_base == 1000000
    mixtral = load_config(imported["mixtral"] / "step_00000000" / "config.yaml").model.llm
    assert (
        mixtral.moe.num_experts,
        mixtral.moe.top_k,
        mixtral.moe.layer_frequency,
        mixtral.moe.expert_ffn_hidden_size,
    ) == (4, 2, 1, 96)
    qwen3 = load_config(imported["qwen3"] / "step_00000000" / "config.yaml").model.llm
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.tie_embeddings, qwen3.qkv_bias) == (
        True,
        24,
        True,
        False,
    )
    qwen3_moe = load_config(imported["qwen3_moe"] / "step_00000000" / "config.yaml").model.llm
    assert qwen3_moe.qk_norm and qwen3_moe.head_dim == 24 and not qwen3_moe.tie_embeddings
    moe = qwen3_moe.moe
    assert (
        moe.num_experts,
        moe.top_k,
        moe.layer_frequency,
        moe.expert_ffn_hidden_size,
        moe.normalize_top_k,
    ) == (4, 2, 2, 48, True)
    clip = load_config(imported["clip"] / "step_00000000" / "config.yaml").model.vision
    assert clip.activation == "gelu" and clip.num_layers == 2 and clip.use_class_token
    assert clip.pre_layernorm and not (clip.post_layernorm or clip.patch_embedding_bias)
    siglip = load_config(imported["siglip_vision"] / "step_00000000" / "config.yaml").model.vision
    assert (
        siglip.use_class_token,
        siglip.patch_embedding_bias,
        siglip.pre_layernorm,
        siglip.post_layernorm,
        siglip.activation,
        siglip.layernorm_epsilon,
    ) == (False, True, False, True, "gelu_tanh", 1e-6)


def test_import_keeps_only_the_imported_part(imported):
    from mm1_megatron.conversion import megatron_io

    assert megatron_io.parts_in_checkpoint(imported["llama"] / "step_00000000") == (
        "language_model",
    )
    assert megatron_io.parts_in_checkpoint(imported["clip"] / "step_00000000") == (
        "vision_encoder",
    )


def test_vocabulary_grows_for_image_and_pad_tokens(
    sources, conversion_dir, inputs, megatron_single_process
):
    from safetensors.torch import load_file

    from mm1_megatron.config import load_config
    from mm1_megatron.conversion import ImportRequest, import_checkpoint
    from tests.conversion.hf_sources import VOCAB, make_word_tokenizer

    tokenizer = conversion_dir / "word_tokenizer"
    make_word_tokenizer(tokenizer)
    output = conversion_dir / "imported_grown"
    import_checkpoint(
        ImportRequest(
            output=output, language_model=sources["llama"][1], tokenizer=tokenizer, vocab_multiple=4
        )
    )
    cfg = load_config(output / "step_00000000" / "config.yaml")
    # <image> and <pad> are appended (130 tokens), rounded up to a multiple of 4.
    assert cfg.model.llm.vocab_size == 132
    assert cfg.data.tokenizer.kind == "huggingface"
    assert cfg.data.tokenizer.path == str(tokenizer.resolve())
    model, _ = _load_tp1(output, "language_model")
    embedding = model.language_model.embedding.word_embeddings.weight
    source = load_file(str(sources["llama"][1] / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(embedding[:VOCAB], source)
    assert torch.allclose(embedding[VOCAB:], source.double().mean(0).float().expand(4, -1))
    logits = our_logits(model, inputs[0]["tokens"])
    reference = sources["llama"][0](inputs[0]["tokens"]).logits.detach()
    assert (logits[..., :VOCAB] - reference).abs().max() <= TOLERANCE
    # The export ships the tokenizer with the added tokens at the ids training used.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mm1_megatron.conversion import ExportRequest, export_checkpoint

    exported = export_checkpoint(
        ExportRequest(checkpoint=output, output=conversion_dir / "exported_grown")
    )
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [VOCAB, VOCAB + 1]
    assert tokenizer.pad_token_id == VOCAB + 1
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(exported)(inputs[0]["tokens"]).logits
    assert theirs.shape[-1] == 132 and (theirs - logits).abs().max() <= TOLERANCE
