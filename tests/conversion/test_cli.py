"""``mm1 convert``: clear errors (exit code 2) and no silent overwrites."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from mm1_megatron.conversion.cli import main, parse_args, parse_size


@pytest.fixture(autouse=True)
def _keep_pytest_logging(monkeypatch, caplog):
    """``main`` reconfigures the root logger for a terminal; keep pytest's capture instead."""
    monkeypatch.setattr("mm1_megatron.conversion.cli.setup_logging", lambda: None)
    caplog.set_level(logging.INFO, logger="mm1_megatron")


def _run(capsys, *argv) -> tuple:
    """Exit code and everything the user would see: log messages and progress lines."""
    handler = _CollectingHandler()
    logging.getLogger("mm1_megatron").addHandler(handler)
    try:
        code = main(list(argv))
    finally:
        logging.getLogger("mm1_megatron").removeHandler(handler)
    return code, "\n".join(handler.messages) + "\n" + capsys.readouterr().err


class _CollectingHandler(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_import_and_export_through_the_cli(
    sources, conversion_dir, capsys, megatron_single_process
):
    output = conversion_dir / "cli_import"
    code, _ = _run(
        capsys,
        "import",
        "--language-model",
        str(sources["llama"][1]),
        "--output",
        str(output),
        "training.seq_length=256",
    )
    assert code == 0 and (output / "latest").read_text().strip() == "step_00000000"
    manifest = json.loads((output / "step_00000000" / "manifest.json").read_text())
    assert "config.yaml" in manifest["files"]
    exported = conversion_dir / "cli_export"
    code, err = _run(
        capsys,
        "export",
        "--checkpoint",
        str(output),
        "--output",
        str(exported),
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "100KB",
    )
    assert code == 0, err
    assert len(list(exported.glob("model-*.safetensors"))) > 1
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    assert "export language model" in err  # the progress line


PRETEND_CUDA = """
import sys
import torch

# A GPU host as far as the code can tell, where any real use of CUDA fails loudly.
torch.cuda.is_available = lambda: True
def _forbidden(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"conversion touched CUDA: torch.cuda.{name}")
    return call
# (manual_seed_all stays: torch.manual_seed calls it, and it only queues the seed until
# CUDA is initialised, which is never.)
for _name in ("init", "set_device", "current_device", "device_count", "synchronize",
              "get_rng_state", "set_rng_state", "manual_seed", "get_device_capability",
              "Stream", "Event", "current_stream"):
    setattr(torch.cuda, _name, _forbidden(_name))
torch.Tensor.cuda = _forbidden("Tensor.cuda")

from mm1_megatron.conversion.cli import main
code = main(sys.argv[1:4] + sys.argv[5:])  # import ... --output OUT [overrides]
assert code == 0, code
code = main(["export", "--checkpoint", sys.argv[4], "--output", sys.argv[4] + "_hf"])
assert code == 0, code
print("converted without CUDA")
"""


def test_conversion_on_a_gpu_host_never_touches_cuda(sources, tmp_path):
    """Conversion is CPU work: with CUDA reported available it must still use gloo and
    CPU tensors, because GPU 0 may be busy or in exclusive-process mode on a cluster."""
    from tests.launch import launcher, run

    output = tmp_path / "imported"
    result = run(
        [
            *launcher(),
            "-c",
            PRETEND_CUDA,
            "import",
            "--language-model",
            str(sources["llama"][1]),
            str(output),
            "--output",
            str(output),
            "training.seq_length=256",
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "converted without CUDA" in result.stdout
    assert (output.parent / "imported_hf" / "config.json").is_file()


def test_refuses_a_non_empty_output_unless_asked(
    sources, conversion_dir, capsys, megatron_single_process
):
    output = conversion_dir / "occupied"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    args = ["import", "--vision-encoder", str(sources["clip_vision"][1]), "--output", str(output)]
    code, err = _run(capsys, *args)
    assert code == 2 and "is not empty" in err and "--overwrite" in err
    assert (output / "keep.txt").read_text() == "mine"
    code, err = _run(capsys, *args, "--overwrite")  # not written by mm1 convert: kept
    assert code == 2 and ".mm1_megatron_output.json" in err
    assert (output / "keep.txt").read_text() == "mine"


def test_shape_mismatch_names_the_tensor_and_both_shapes(
    sources, conversion_dir, capsys, megatron_single_process
):
    source = conversion_dir / "mismatched"
    shutil.copytree(sources["llama"][1], source)
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 96
    (source / "config.json").write_text(json.dumps(config))
    code, err = _run(
        capsys,
        "import",
        "--language-model",
        str(source),
        "--output",
        str(conversion_dir / "mismatched_out"),
    )
    assert code == 2
    assert "model.layers.0.mlp.gate_proj.weight" in err
    assert "(128, 64)" in err and "(96, 64)" in err
    assert not (conversion_dir / "mismatched_out").exists()


def _edited_source(sources, conversion_dir, name, target, edit):
    source = conversion_dir / target
    shutil.copytree(sources[name][1], source)
    config = json.loads((source / "config.json").read_text())
    edit(config)
    (source / "config.json").write_text(json.dumps(config))
    return source


@pytest.mark.parametrize(
    "case, edit, message",
    [
        (
            "gpt2",
            lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
            "unsupported language model type: 'gpt2'",
        ),
        (
            "rope_scaled",
            lambda c: c.update(
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
            ),
            "RoPE scaling",
        ),
        ("gelu_mlp", lambda c: c.update(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_unsupported_language_models_are_refused(
    case, edit, message, sources, conversion_dir, capsys
):
    source = _edited_source(sources, conversion_dir, "llama", f"bad_{case}", edit)
    code, err = _run(
        capsys,
        "import",
        "--language-model",
        str(source),
        "--output",
        str(conversion_dir / f"bad_{case}_out"),
    )
    assert code == 2 and message in err


def test_qwen3_with_attention_biases_is_refused(sources, conversion_dir, capsys):
    """Qwen3's attention_bias also biases o_proj, which our decoder does not have."""
    source = _edited_source(
        sources, conversion_dir, "qwen3", "bad_qwen3_bias", lambda c: c.update(attention_bias=True)
    )
    output = conversion_dir / "bad_qwen3_bias_out"
    code, err = _run(capsys, "import", "--language-model", str(source), "--output", str(output))
    assert code == 2 and "attention_bias" in err


def test_renormalised_top1_routing_is_refused(sources, conversion_dir, capsys):
    """norm_topk_prob with one expert per token: every weight 1, which cannot train."""
    source = _edited_source(
        sources,
        conversion_dir,
        "qwen3_moe",
        "bad_qwen3_moe_top1",
        lambda c: c.update(num_experts_per_tok=1),
    )
    output = conversion_dir / "bad_qwen3_moe_top1_out"
    code, err = _run(capsys, "import", "--language-model", str(source), "--output", str(output))
    assert code == 2 and "router normalisation" in err


def test_source_aux_loss_coefficient_is_kept_without_a_config(imported):
    """Qwen3MoeConfig's router_aux_loss_coef (0.001 by default), not the schema's 0.01."""
    from mm1_megatron.config import load_config

    moe = load_config(imported["qwen3_moe"] / "step_00000000" / "config.yaml").model.llm.moe
    assert moe.aux_loss_coeff == 0.001


def test_q_k_norms_with_q_k_v_biases_have_no_export_class():
    from mm1_megatron.config.schema import LanguageModelConfig
    from mm1_megatron.conversion.errors import ConversionError
    from mm1_megatron.conversion.target_configs import language_target

    assert language_target(LanguageModelConfig(qk_norm=True)) == "qwen3"
    with pytest.raises(ConversionError, match="q/k norms and q/k/v biases"):
        language_target(LanguageModelConfig(qk_norm=True, qkv_bias=True))


def test_siglip_model_vision_half_imports_without_its_head(
    conversion_dir, capsys, megatron_single_process
):
    from transformers import SiglipConfig, SiglipModel

    from mm1_megatron.config import load_config

    folder = conversion_dir / "siglip_full"
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
    )
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(str(folder))
    output = conversion_dir / "siglip_full_out"
    code, err = _run(capsys, "import", "--vision-encoder", str(folder), "--output", str(output))
    assert code == 0, err
    assert "attention-pooling head" in err
    v = load_config(output / "step_00000000" / "config.yaml").model.vision
    assert (
        v.use_class_token,
        v.patch_embedding_bias,
        v.pre_layernorm,
        v.post_layernorm,
        v.activation,
        v.layernorm_epsilon,
    ) == (False, True, False, True, "gelu_tanh", 1e-6)


def test_other_vision_models_are_refused_with_the_reason(conversion_dir, capsys):
    """A vision model none of our ViT layouts computes (DINOv2: layer scale, no SigLIP or
    CLIP stem) is refused by its model type, naming the supported ones."""
    folder = conversion_dir / "dinov2"
    folder.mkdir()
    config = {"model_type": "dinov2", "hidden_size": 32, "num_hidden_layers": 1}
    (folder / "config.json").write_text(json.dumps(config))
    code, err = _run(
        capsys,
        "import",
        "--vision-encoder",
        str(folder),
        "--output",
        str(conversion_dir / "dinov2_out"),
    )
    assert code == 2 and "'dinov2'" in err and "siglip2_vision_model" in err


def test_pickle_weights_are_refused_unread(sources, conversion_dir, capsys):
    source = conversion_dir / "pickled"
    shutil.copytree(sources["llama"][1], source)
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"not even read")
    code, err = _run(
        capsys,
        "import",
        "--language-model",
        str(source),
        "--output",
        str(conversion_dir / "pickled_out"),
    )
    assert code == 2 and "pytorch_model.bin" in err and "never" in err


def test_unmapped_source_tensors_are_refused(
    sources, conversion_dir, capsys, megatron_single_process
):
    from safetensors.torch import load_file, save_file

    source = conversion_dir / "extra_tensor"
    shutil.copytree(sources["llama"][1], source)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_norm.weight"] = tensors["model.norm.weight"][:16].clone()
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    code, err = _run(
        capsys,
        "import",
        "--language-model",
        str(source),
        "--output",
        str(conversion_dir / "extra_tensor_out"),
    )
    assert code == 2 and "model.layers.0.self_attn.q_norm.weight" in err


def test_llava_needs_the_mlp_connector(
    worker_outputs, conversion_dir, capsys, megatron_single_process
):
    code, err = _run(
        capsys,
        "export",
        "--checkpoint",
        str(worker_outputs / "dense_tp2" / "ckpt"),
        "--format",
        "llava",
        "--output",
        str(conversion_dir / "no_llava"),
    )
    assert code == 2 and "model.connector.type=mlp" in err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("100KB") == 100_000
    assert parse_size("123") == 123


def test_config_files_stack_and_are_inputs(tmp_path):
    """``--config`` repeats like every verb's; each file is an input the output may not be."""
    from mm1_megatron.conversion.importer import ImportRequest, _inputs

    args = parse_args(["import", "--config", "a.yaml", "--config", "b.yaml", "--output", "o"])
    assert args.config == ["a.yaml", "b.yaml"]
    request = ImportRequest(output=tmp_path, base_config=args.config)
    assert _inputs(request)[-2:] == ["a.yaml", "b.yaml"]
    assert parse_args(["import", "--output", "o"]).config == []
