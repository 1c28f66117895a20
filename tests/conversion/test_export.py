"""Export: round trips are bit-exact, exported models compute what ours do.

- import -> export reproduces every tensor of the source bit for bit;
- the debug model trained at TP=2 (dense) and EP=2 (MoE every 2nd layer), exported as the
  whole MM1 model and reloaded with ``from_pretrained``, gives the trained model's logits
  (<= 1e-4) and the same 20 greedy tokens with ``generate()``;
- a LLaVA export loads in a process where ``mm1_megatron`` cannot be imported.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from mm1_megatron.config.schema import MODEL_PARTS
from tests.conversion.conftest import TOLERANCE, TRAINS, WITHOUT_OUR_PACKAGE, export_to

logger = logging.getLogger(__name__)
ROUND_TRIPS = (
    "llama",
    "qwen2",
    "mixtral",
    "qwen3",
    "qwen3_moe",
    "clip_vision",
    "clip",
    "siglip_vision",
)


@pytest.fixture(scope="module")
def round_trips(imported, conversion_dir, megatron_single_process):
    return {
        name: export_to(imported[name], conversion_dir / "round_trip" / name)
        for name in ROUND_TRIPS
    }


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_import_export_round_trip_is_bit_exact(name, sources, round_trips):
    from mm1_megatron.conversion.safetensors_io import SafetensorsFolder

    source, exported = SafetensorsFolder(sources[name][1]), SafetensorsFolder(round_trips[name])
    anchor = "embeddings.patch_embedding.weight"
    vision = "clip" in name or "siglip" in name
    source_prefix = source.find_prefix(anchor) if vision else ""
    exported_prefix = exported.find_prefix(anchor) if vision else ""
    source_names = {k[len(source_prefix) :] for k in source.keys() if k.startswith(source_prefix)}
    if "siglip" in name:  # the attention-pooling head is not imported, nor exported
        source_names = {k for k in source_names if not k.startswith("head.")}
    assert source_names == {k[len(exported_prefix) :] for k in exported.keys()}
    for key in sorted(source_names):
        exported_tensor = exported.get(exported_prefix + key)
        assert torch.equal(source.get(source_prefix + key), exported_tensor), key


@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral", "qwen3", "qwen3_moe"])
def test_exported_language_model_reloads_with_the_source_logits(name, sources, round_trips, inputs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(round_trips[name], output_loading_info=True)
    assert not any(info.values()), info
    assert type(model) is type(sources[name][0])
    tokens = inputs[0]["tokens"]
    with torch.no_grad():
        diff = model.eval()(tokens).logits - sources[name][0](tokens).logits
    assert diff.abs().max() <= 1e-6


def _trained(worker_outputs, name):
    from safetensors.torch import load_file

    return load_file(str(worker_outputs / f"{name}.safetensors"))


@pytest.mark.parametrize("name", sorted(TRAINS))
def test_trained_model_export_matches_logits_and_greedy_generation(
    name, worker_outputs, trained_exports
):
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"

    reference = _trained(worker_outputs, name)
    model, info = AutoModelForImageTextToText.from_pretrained(
        trained_exports[name], output_loading_info=True
    )
    assert not any(info.values()), info
    model.eval()
    tokens, images = reference["tokens"], reference["images"]
    with torch.no_grad():
        logits = model(input_ids=tokens, pixel_values=images).logits
    diff = (logits - reference["prompt_logits"]).abs().max()
    logger.info("%s: exported MM1 logits max abs diff %.3g", name, diff)
    assert diff <= TOLERANCE
    generated = model.generate(
        input_ids=tokens,
        pixel_values=images,
        attention_mask=torch.ones_like(tokens),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
    )
    assert generated[:, tokens.shape[1] :].tolist() == reference["generated"].tolist()


def test_moe_every_second_layer_exports_as_qwen2_moe(
    trained_exports, worker_outputs, conversion_dir
):
    from transformers import AutoModelForCausalLM

    config = json.loads((trained_exports["moe_ep2"] / "config.json").read_text())
    text = config["text_config"]
    assert text["model_type"] == "qwen2_moe" and text["mlp_only_layers"] == [1, 3]
    assert text["shared_expert_intermediate_size"] == 0 and text["norm_topk_prob"]
    assert "Qwen2MoeForCausalLM" in (trained_exports["moe_ep2"] / "README.md").read_text()
    folder = export_to(
        worker_outputs / "moe_ep2" / "ckpt", conversion_dir / "moe_lm", format="language-model"
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"


def test_decoders_with_q_k_norms_export_as_qwen3(trained_exports, round_trips):
    text = json.loads((trained_exports["qwen3_trained_tp2"] / "config.json").read_text())
    text = text["text_config"]
    assert (text["model_type"], text["head_dim"], text["hidden_size"]) == ("qwen3", 48, 128)
    assert not text["attention_bias"]
    moe = json.loads((round_trips["qwen3_moe"] / "config.json").read_text())
    assert (moe["model_type"], moe["head_dim"]) == ("qwen3_moe", 24)
    assert moe["norm_topk_prob"] and moe["mlp_only_layers"] == [1]


def test_export_writes_the_hugging_face_side_files(trained_exports):
    from transformers import AutoTokenizer, GenerationConfig

    folder = trained_exports["dense_tp2"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert all((folder / shard).is_file() for shard in set(index["weight_map"].values()))
    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_id"]
    assert tokenizer.encode("a red circle .", add_special_tokens=False) == [
        tokenizer.convert_tokens_to_ids(w) for w in ("a", "red", "circle", ".")
    ]
    generation = GenerationConfig.from_pretrained(folder)
    assert generation.eos_token_id == tokenizer.eos_token_id
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["crop_size"]["height"] == config["vision_config"]["image_size"]
    card = (folder / "README.md").read_text()
    assert "## Training configuration" in card and "tensor_parallel_size: 2" in card
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))


LLAVA_CHECK = (
    WITHOUT_OUR_PACKAGE
    + """
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration
from PIL import Image
folder, reference = sys.argv[1], load_file(sys.argv[2])
model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(input_ids=reference["tokens"], pixel_values=reference["images"]).logits
print("max_abs_diff", float((logits - reference["logits"]).abs().max()))
processor = AutoProcessor.from_pretrained(folder)
batch = processor(text="<image> red", images=[Image.new("RGB", (80, 60))], return_tensors="pt")
print("image_tokens", int((batch["input_ids"] == model.config.image_token_id).sum()))
model.generate(**batch, max_new_tokens=3, do_sample=False)
print("loaded_mm1_megatron", any(m.startswith("mm1_megatron") for m in sys.modules))
"""
)


def test_llava_export_loads_without_our_package(
    tiny_config, conversion_dir, megatron_single_process
):
    from safetensors.torch import save_file

    from mm1_megatron.config import save_config
    from mm1_megatron.conversion import megatron_io

    cfg = tiny_config("model.connector.type=mlp", "model.connector.num_output_tokens=16")
    checkpoint = conversion_dir / "llava_ckpt"
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=3, seed=3)
    step = checkpoint / "step_00000000"
    megatron_io.save_parts(model, step, MODEL_PARTS)
    save_config(cfg, step / "config.yaml")
    megatron_io.write_published_checkpoint(checkpoint, step.name)
    tokens = torch.tensor([[1] + [3] * 16 + list(range(10, 20))])
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        logits = model(tokens, positions, torch.zeros_like(tokens), images=images)
    reference = conversion_dir / "llava_reference.safetensors"
    save_file({"tokens": tokens, "images": images, "logits": logits}, str(reference))
    folder = export_to(checkpoint, conversion_dir / "llava", format="llava")
    result = subprocess.run(
        [sys.executable, "-c", LLAVA_CHECK, str(folder), str(reference)],
        cwd=conversion_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    logger.info("llava export max abs diff %s", lines["max_abs_diff"])
    assert float(lines["max_abs_diff"]) <= TOLERANCE
    assert lines["image_tokens"] == "16" and lines["loaded_mm1_megatron"] == "False"


def test_mixtral_style_mm1_export_matches(tiny_config, conversion_dir, megatron_single_process):
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401
    from mm1_megatron.config import save_config
    from mm1_megatron.conversion import megatron_io
    from tests.conversion.hf_sources import randomize

    cfg = tiny_config("model.llm.moe.num_experts=4")
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=3, seed=4)
    randomize(model, seed=4)
    checkpoint = conversion_dir / "mixtral_mm1_ckpt"
    step = checkpoint / "step_00000000"
    megatron_io.save_parts(model, step, MODEL_PARTS)
    save_config(cfg, step / "config.yaml")
    megatron_io.write_published_checkpoint(checkpoint, step.name)
    folder = export_to(checkpoint, conversion_dir / "mixtral_mm1")
    exported = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(exported.language_model).__name__ == "MixtralForCausalLM"
    tokens = torch.tensor([[1] + [3] * 4 + list(range(10, 30))])
    images = torch.randn(1, 3, 56, 56)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        ours = model(tokens, positions, torch.zeros_like(tokens), images=images)
        theirs = exported(input_ids=tokens, pixel_values=images).logits
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_exported_siglip_reloads_without_head_with_the_source_features(
    sources, round_trips, inputs
):
    from transformers import SiglipVisionModel

    from tests.conversion.hf_sources import vision_features

    model, info = SiglipVisionModel.from_pretrained(
        round_trips["siglip_vision"], output_loading_info=True
    )
    assert not any(info.values()), info
    assert not model.config.vision_use_head
    images = inputs[0]["images"]
    with torch.no_grad():
        diff = vision_features(model.eval(), images) - vision_features(
            sources["siglip_vision"][0], images
        )
    assert diff.abs().max() <= 1e-6


def test_exported_model_merges_images_across_devices(trained_exports, monkeypatch):
    """device_map="auto" may put the vision tower and the embeddings on different GPUs:
    the image features must be moved to the embeddings' device (two real devices are not
    available here, so the move is observed on a stand-in for the features)."""
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401  registers model_type "mm1"

    model = AutoModelForImageTextToText.from_pretrained(trained_exports["dense_tp2"])
    no_split = model._no_split_modules  # post_init gathers the submodels' lists
    assert "CAbstractor" in no_split and any("DecoderLayer" in name for name in no_split)

    num_tokens, hidden = model.config.num_image_tokens, model.config.text_config.hidden_size
    requested = {}

    class FeaturesOnAnotherDevice:
        shape = (1, num_tokens, hidden)

        def to(self, *args, **kwargs):
            requested.update(kwargs, args=args)
            return torch.ones(1, num_tokens, hidden)

    monkeypatch.setattr(model, "get_image_features", lambda pixel_values: FeaturesOnAnotherDevice())
    input_ids = torch.full((1, num_tokens + 2), model.config.image_token_id)
    input_ids[0, -2:] = 5
    embeds = model.get_input_embeddings()(input_ids)
    merged = model._merge_images(input_ids, embeds, torch.zeros(1), past_key_values=None)
    assert requested["device"] == embeds.device and requested["dtype"] == embeds.dtype
    assert torch.equal(merged[0, :num_tokens], torch.ones(num_tokens, hidden))
