"""Llama-3.x RoPE scaling (``rope_type: llama3``): import parity, export round trip, and
refusal of parameters Megatron-Core's rule does not implement."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from tests.conversion.conftest import TOLERANCE
from tests.conversion.hf_sources import TEXT, VOCAB, randomize

logger = logging.getLogger(__name__)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _llama(rope_parameters):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(**TEXT, rope_parameters=dict(rope_parameters), rms_norm_eps=1e-5)
    )


@pytest.fixture(scope="module")
def llama3_source(conversion_dir):
    model = _llama(LLAMA3_ROPE)
    randomize(model, seed=42)
    folder = conversion_dir / "hf" / "llama3_rope"
    model.save_pretrained(str(folder))
    return model.eval(), folder


@pytest.fixture(scope="module")
def long_tokens():
    # Long enough for the scaled (low) frequencies to turn by a visible angle.
    # Token 0 is the image placeholder of the model _load_tp1 builds: leave it out.
    return torch.randint(1, VOCAB, (2, 240), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def llama3_imported(llama3_source, conversion_dir, megatron_single_process):
    from mm1_megatron.conversion import ImportRequest, import_checkpoint

    output = conversion_dir / "imported" / "llama3_rope"
    import_checkpoint(ImportRequest(output=output, language_model=llama3_source[1]))
    return output


def test_llama3_rope_scaling_import_parity(llama3_source, llama3_imported, long_tokens):
    from mm1_megatron.config import load_config
    from tests.conversion.test_import import _load_tp1, our_logits

    llm = load_config(llama3_imported / "step_00000000" / "config.yaml").model.llm
    assert (llm.rotary_base, llm.rope_scaling_factor) == (500000, 8.0)
    model, _ = _load_tp1(llama3_imported, "language_model")
    with torch.no_grad():
        reference = llama3_source[0](long_tokens).logits
        ours = our_logits(model, long_tokens)
        plain = _llama({"rope_type": "default", "rope_theta": 500000.0})
        plain.load_state_dict(llama3_source[0].state_dict())
        unscaled = plain.eval()(long_tokens).logits
    diff = (ours - reference).abs().max()
    logger.info("llama3 RoPE scaling TP=1 logits max abs diff %.3g", diff)
    assert diff <= TOLERANCE
    # The test can tell scaled from plain RoPE.
    assert (unscaled - reference).abs().max() > 100 * TOLERANCE


def test_llama3_rope_scaling_round_trip(
    llama3_source, llama3_imported, long_tokens, conversion_dir, megatron_single_process
):
    from transformers import AutoModelForCausalLM

    from mm1_megatron.conversion import ExportRequest, export_checkpoint
    from mm1_megatron.conversion.safetensors_io import SafetensorsFolder

    exported = export_checkpoint(
        ExportRequest(checkpoint=llama3_imported, output=conversion_dir / "round_trip" / "llama3")
    )
    rope = json.loads((exported / "config.json").read_text())["rope_parameters"]
    assert {k: rope[k] for k in LLAMA3_ROPE} == LLAMA3_ROPE
    source, ours = SafetensorsFolder(llama3_source[1]), SafetensorsFolder(exported)
    assert set(source.keys()) == set(ours.keys())
    for key in source.keys():
        assert torch.equal(source.get(key), ours.get(key)), key
    with torch.no_grad():
        diff = (
            AutoModelForCausalLM.from_pretrained(exported).eval()(long_tokens).logits
            - llama3_source[0](long_tokens).logits
        )
    assert diff.abs().max() <= 1e-6


@pytest.mark.parametrize(
    "field, value",
    [
        ("low_freq_factor", 2.0),
        ("high_freq_factor", 8.0),
        ("original_max_position_embeddings", 4096),
    ],
)
def test_llama3_parameters_other_than_megatron_cores_are_refused(
    field, value, llama3_source, conversion_dir
):
    from mm1_megatron.conversion.errors import ConversionError
    from mm1_megatron.conversion.source_configs import language_source

    folder = conversion_dir / f"llama3_bad_{field}"
    shutil.copytree(llama3_source[1], folder)
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=field):
        language_source(folder)
