"""Export of a fine-tuned (SFT) checkpoint: plain ``transformers`` preprocesses as training.

A tiny model trained on conversations with tiles (``data.tiling``: MM1's static 2x2 grid
plus an overview after the tiles, and MM1.5's dynamic grid of 1 to 4 tiles with the
overview before them, both at 112 px over a ViT pre-trained at 56 px) is exported, and a
process where ``mm1_megatron`` cannot be imported loads the folder with
``AutoTokenizer`` / ``AutoProcessor`` / ``AutoModelForImageTextToText`` and
``trust_remote_code``. Against our own pipeline (``tokenize_conversation``,
``tile_sample``, ``pack_sequence``) and our Megatron model:

- ``tokenizer.apply_chat_template(messages)`` gives ``tokenize_conversation``'s ids, for a
  multi-turn conversation with a system turn, two images and list-of-parts content;
- ``processor(text=..., images=...)`` gives the packed sequence's tokens and its pixel
  tiles exactly (``torch.equal``), and one ``num_tiles`` per image as ``plan_tiles``;
  also for three images (not split: ``max_images_to_split``) and for a PNG file with an
  EXIF orientation, opened with PIL, against the shard pipeline's ``decode_tiles``;
- the exported model's logits on them match ours within 1e-4;
- ``add_generation_prompt=True`` ends the prompt with the assistant marker, and
  ``generate()`` on the processor's output starts with our model's greedy token.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mm1_megatron.config.schema import MODEL_PARTS
from tests.conftest import make_tiny_config
from tests.conversion.conftest import SFT_EXPORTS as EXPORTS
from tests.conversion.conftest import TOLERANCE, export_to
from tests.launch import clean_env

logger = logging.getLogger(__name__)
SIDE = Path(__file__).with_name("sft_transformers_side.py")


@dataclasses.dataclass
class Case:
    """A conversation as training reads it, and as ``transformers`` chat messages."""

    turns: list  # of data.shards.conversations.Turn
    images: list  # [3, H, W] float tensors in [0, 1]
    messages: list
    png: dict = dataclasses.field(default_factory=dict)  # image index -> PNG file


def _cases(folder: Path):
    from PIL import Image

    from mm1_megatron.data.shards.conversations import Turn
    from mm1_megatron.data.synthetic.conversations import synthetic_conversation
    from mm1_megatron.data.synthetic.world import draw_scene

    rng = np.random.default_rng(7)
    first, scene = synthetic_conversation(rng, min_turns=2, max_turns=2)
    second, _ = synthetic_conversation(rng, min_turns=2, max_turns=3)
    wide = torch.rand(3, 90, 300, generator=torch.Generator().manual_seed(7))
    turns = [Turn("system", "describe the picture ."), *first.turns, *second.turns]
    second_image = 1 + len(first.turns)  # its first user turn, LLaVA-style
    turns[second_image] = Turn("user", turns[second_image].text.replace("<image> ", "<image>\n"))
    messages = _messages(turns)
    question = turns[second_image].text.split("\n", 1)[1]  # as content parts
    messages[second_image]["content"] = [{"type": "image"}, {"type": "text", "text": question}]
    conversation = Case(turns, [draw_scene(scene, 224), wide], messages)

    three = [
        torch.rand(3, 60 + 20 * i, 80, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    three_turns = [
        Turn("user", "<image> <image> how many shapes ? <image>"),
        Turn("assistant", "two ."),
    ]
    pixels = np.random.default_rng(3).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: displayed rotated, 61 x 97
    Image.fromarray(pixels).save(folder / "small.png", exif=exif)
    pil_turns = [Turn("user", "<image> describe the picture ."), Turn("assistant", "nothing .")]
    upright = torch.from_numpy(np.rot90(pixels, k=-1).copy()).permute(2, 0, 1)
    return {
        "conversation": conversation,
        "three_images": Case(three_turns, three, _messages(three_turns)),
        "pil": Case(pil_turns, [upright / 255.0], _messages(pil_turns), {0: folder / "small.png"}),
    }


def _messages(turns):
    return [{"role": t.role, "content": t.text} for t in turns]


def _ours(cfg, case: Case):
    """Training's pipeline: token ids, then the packed sequence's tokens and tiles."""
    from mm1_megatron.data.pipeline.packing import Sample, pack_sequence
    from mm1_megatron.data.pipeline.tiling import plan_tiles, separator_token, tile_sample
    from mm1_megatron.data.shards.conversations import (
        ChatTemplate,
        Conversation,
        tokenize_conversation,
    )
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

    tokenizer = SyntheticTokenizer()
    template = ChatTemplate(**dataclasses.asdict(cfg.data.conversations.chat_template))
    names = tuple(f"image{i}" for i in range(len(case.images)))
    ids, targets = tokenize_conversation(
        Conversation(tuple(case.turns), names), template, tokenizer
    )
    vision = cfg.model.vision
    sample = tile_sample(
        Sample("conversation", ids, list(case.images), trainable=targets),
        cfg.data.tiling,
        image_token_id=tokenizer.image_token_id,
        fill=vision.image_mean,
        separator_id=separator_token(cfg.data.tiling, tokenizer),
    )
    packed = pack_sequence(
        [sample],
        seq_length=cfg.training.seq_length,
        num_image_tokens=cfg.model.connector.num_output_tokens,
        max_images=len(sample.images),
        tokenizer=tokenizer,
        image_size=cfg.data.tiling.tile_size,
        image_mean=vision.image_mean,
        image_std=vision.image_std,
        one_per_sequence=True,
    )
    sizes = [(int(image.shape[2]), int(image.shape[1])) for image in case.images]
    plans = plan_tiles(sizes, cfg.data.tiling)
    tiles = packed.images
    if case.png:  # an image file: the shard pipeline's decoder cuts the tiles
        from mm1_megatron.data.pipeline.images import PILImageDecoder, image_size_of

        (blob,) = [path.read_bytes() for path in case.png.values()]
        assert [image_size_of(blob)] == sizes  # the EXIF orientation is applied
        decoder = PILImageDecoder(
            image_size=cfg.data.tiling.tile_size, mean=vision.image_mean, std=vision.image_std
        )
        tiles = torch.stack(decoder.decode_tiles([blob], plans)[0])
    return ids, packed.tokens[: packed.num_real_tokens], tiles, [p.num_tiles for p in plans]


@pytest.fixture(scope="module")
def transformers_side(sft_run, conversion_dir):
    """Runs ``sft_transformers_side.py`` on both exports; returns its outputs and cases."""
    from safetensors.torch import save_file

    _, exports, _ = sft_run
    folder = conversion_dir / "sft_side"
    folder.mkdir()
    cases = _cases(folder)
    tensors, spec_cases = {}, []
    for name, case in cases.items():
        images = []
        for index, image in enumerate(case.images):
            if index in case.png:
                images.append({"png": str(case.png[index])})
            else:
                tensors[f"{name}.{index}"] = image.contiguous()
                images.append({"tensor": f"{name}.{index}"})
        spec_case = {"name": name, "messages": case.messages, "images": images}
        if name == "conversation":  # generate the last answer
            spec_case["prompt"] = case.messages[:-1]
        spec_cases.append(spec_case)
    save_file(tensors, str(folder / "images.safetensors"))
    spec = {
        "exports": {name: str(path) for name, path in exports.items()},
        "cases": spec_cases,
        "tensors": str(folder / "images.safetensors"),
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    env = clean_env(HF_MODULES_CACHE=str(folder / "hf_modules"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(SIDE), str(folder / "spec.json"), str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [] and report["processor"].startswith("transformers_modules.")
    return folder, cases


def _side(folder, export, case):
    from safetensors.torch import load_file

    return load_file(str(folder / f"{export}-{case}.safetensors"))


@pytest.mark.parametrize("export", sorted(EXPORTS))
@pytest.mark.parametrize("case", ["conversation", "three_images", "pil"])
def test_transformers_preprocessing_and_logits_match_training(
    export, case, sft_run, transformers_side
):
    configs, _, model = sft_run
    folder, cases = transformers_side
    theirs = _side(folder, export, case)
    ids, tokens, tiles, num_tiles = _ours(configs[export], cases[case])
    assert theirs["chat_ids"].tolist() == ids
    assert theirs["input_ids"].tolist() == tokens.tolist()
    assert theirs["num_tiles"].tolist() == num_tiles
    assert theirs["pixel_values"].shape == tiles.shape
    assert torch.equal(theirs["pixel_values"], tiles)
    positions = torch.arange(tokens.shape[0])[None]
    with torch.no_grad():
        ours = model(tokens[None], positions, torch.zeros_like(positions), images=tiles)[0]
    diff = (ours - theirs["logits"]).abs().max()
    logger.info("%s %s: exported SFT model logits max abs diff %.3g", export, case, diff)
    assert diff <= TOLERANCE
    if case == "conversation":
        _check_generation(configs[export], tokens, ours, theirs)


def _check_generation(cfg, tokens, our_logits, theirs):
    """The prompt is our conversation up to its last assistant marker; ``generate()``
    continues it with our model's greedy token there."""
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer

    assistant = SyntheticTokenizer().encode(cfg.data.conversations.chat_template.assistant)[0]
    last = max(i for i, token in enumerate(tokens.tolist()) if token == assistant)
    prompt = theirs["prompt_ids"]
    assert prompt.tolist() == tokens[: last + 1].tolist()
    generated = theirs["generated"]
    assert generated[: prompt.shape[0]].tolist() == prompt.tolist()
    assert generated.shape[0] > prompt.shape[0]
    assert int(generated[prompt.shape[0]]) == int(our_logits[last].argmax())


def test_dynamic_grids_are_training_grids():
    """The exported processor's grid choice against ``plan_tiles`` (itself tested against
    a brute-force search), ties included (squares: 3x1 and 1x3 tie; tiny images)."""
    from mm1_megatron.config.schema import TilingConfig
    from mm1_megatron.data.pipeline.tiling import plan_tiles
    from mm1_megatron.hf_model.image_processing_mm1 import MM1ImageProcessor

    sizes = [tuple(map(int, s)) for s in np.random.default_rng(0).integers(1, 1500, (120, 2))]
    sizes += [(10, 10), (336, 336), (1000, 1000), (672, 336), (100, 2000), (1, 700)]
    for low, high in ((4, 9), (1, 16), (3, 3)):
        tiling = dict(mode="dynamic", tile_size=336, min_tiles=low, max_tiles=high)
        processor = MM1ImageProcessor(**tiling)
        for size in sizes:
            (plan,) = plan_tiles([size], TilingConfig(**tiling))
            assert processor.plan([size]) == [(plan.grid.cols, plan.grid.rows)], (size, low, high)


@pytest.mark.parametrize("byte_order", ["<u2", ">u2"])
def test_sixteen_bit_grey_images_get_trainings_pixels_not_white(byte_order):
    """A 16-bit greyscale PIL image through the exported processor: the pixels of
    training's decoder (``round(v / 257)``, data/shards/image_modes.py), where Pillow's
    ``convert("RGB")`` alone clips every value over 255 to white."""
    from PIL import Image

    from mm1_megatron.data.shards.image_modes import decode_rgb
    from mm1_megatron.hf_model.image_processing_mm1 import _unit_pixels

    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(byte_order)
    image = Image.fromarray(values)
    pixels = (_unit_pixels(image) * 255).round().to(torch.int64)
    expected = (values.astype(np.int64) + 128) // 257
    assert torch.equal(pixels, torch.from_numpy(expected).expand(3, -1, -1))
    saved = io.BytesIO()
    image.save(saved, format="PNG")
    trained = np.asarray(decode_rgb(saved.getvalue())).transpose(2, 0, 1)
    assert torch.equal(pixels, torch.from_numpy(trained.astype(np.int64)))
    with pytest.raises(ValueError, match="unsupported pixel mode F"):
        _unit_pixels(Image.fromarray(values.astype(np.float32)))


def _sentencepiece_with_markers(folder: Path):
    """``train_sentencepiece``'s model: the markers are pieces (ids 5-8), and a piece of
    text encoded on its own starts with the dummy-prefix space."""
    from mm1_megatron.data.tokenizers.text import SentencePieceTokenizer, train_sentencepiece
    from tests.data.test_text_tokenizers import CORPUS

    path = train_sentencepiece(CORPUS, folder / "tok", vocab_size=80)
    return "sentencepiece", str(path), SentencePieceTokenizer(path)


def _byte_level_bpe_with_markers(folder: Path):
    """A GPT-2-style tokenizer: a leading space changes the tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mm1_megatron.data.tokenizers.text import HuggingFaceTokenizer
    from tests.data.test_text_tokenizers import CORPUS

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<system>", "<user>", "<assistant>", "<end_turn>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    hf.save_pretrained(folder / "bpe")
    return "huggingface", str(folder / "bpe"), HuggingFaceTokenizer(folder / "bpe")


@pytest.mark.parametrize("build", [_sentencepiece_with_markers, _byte_level_bpe_with_markers])
def test_chat_template_gives_training_ids_where_whitespace_matters(build, tmp_path):
    """Subword tokenizers: the template must cut the text where training does (markers,
    images) and strip each piece, or the ids differ."""
    from transformers import AutoTokenizer

    from mm1_megatron.config.schema import ChatTemplateConfig
    from mm1_megatron.conversion.tokenizer_files import TokenizerSource, write_tokenizer
    from mm1_megatron.data.shards.conversations import (
        ChatTemplate,
        Conversation,
        Turn,
        template_token,
        tokenize_conversation,
    )

    kind, path, ours = build(tmp_path)
    (tmp_path / "out").mkdir()
    write_tokenizer(TokenizerSource(kind, path, ours), tmp_path / "out", ChatTemplateConfig())
    hf = AutoTokenizer.from_pretrained(tmp_path / "out")
    turns = [
        Turn("system", "  a red circle "),
        Turn("user", "<image>\n two  blue squares ?<image> the cat"),
        Turn("assistant", "here is a picture of a cat"),
        Turn("user", "the <image>lazy dog !"),
        Turn("assistant", " quick brown fox"),
    ]
    conversation = Conversation(tuple(turns), ("a", "b", "c"))
    ids, _ = tokenize_conversation(conversation, ChatTemplate(), ours)
    messages = _messages(turns)
    assert hf.apply_chat_template(messages)["input_ids"] == ids
    prompt = hf.apply_chat_template(messages[:-1], add_generation_prompt=True)["input_ids"]
    assistant = template_token(ours, "<assistant>")
    assert prompt == ids[: len(prompt)] and prompt[-1] == assistant
    assert ids[len(prompt)] != assistant  # the answer's first token comes next
    text = hf.decode(ids, skip_special_tokens=True)  # markers are special tokens
    assert "quick" in text and not any(m in text for m in ("<user>", "<end_turn>", "<image>"))


def test_chat_markers_that_are_not_single_tokens_are_refused(tmp_path):
    import sentencepiece

    from mm1_megatron.config.schema import ChatTemplateConfig
    from mm1_megatron.conversion.errors import ConversionError
    from mm1_megatron.conversion.tokenizer_files import TokenizerSource, write_tokenizer
    from mm1_megatron.data.tokenizers.text import SentencePieceTokenizer
    from tests.data.test_text_tokenizers import CORPUS

    sentencepiece.SentencePieceTrainer.train(  # no chat markers among its pieces
        sentence_iterator=iter(CORPUS),
        model_prefix=str(tmp_path / "plain"),
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = tmp_path / "plain.model"
    source = TokenizerSource("sentencepiece", str(path), SentencePieceTokenizer(path))
    (tmp_path / "out").mkdir()
    with pytest.raises(ConversionError, match="marker '<system>' is .* tokens"):
        write_tokenizer(source, tmp_path / "out", ChatTemplateConfig())


def test_sft_export_ships_processor_code_stops_and_usage(sft_run, tmp_path):
    """The processor's code and configs, generation stopping at the end-of-turn marker;
    through our package the processor loads without remote code, and saved again it
    keeps its code."""
    from transformers import GenerationConfig

    import mm1_megatron.hf_model.register  # noqa: F401  registers MM1ImageProcessor
    from mm1_megatron import hf_model
    from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
    from mm1_megatron.hf_model import PROCESSOR_AUTO_MAP, PROCESSOR_CODE_FILES
    from mm1_megatron.hf_model.processing_mm1 import MM1Processor

    configs, exports, _ = sft_run
    folder = exports["static"]
    for name in PROCESSOR_CODE_FILES:
        assert (folder / name).read_bytes() == Path(hf_model.__file__).with_name(name).read_bytes()
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    assert settings["auto_map"] == PROCESSOR_AUTO_MAP
    assert (settings["mode"], settings["tile_size"], settings["static_grid"]) == (
        "static",
        112,
        [2, 2],
    )
    tokenizer = SyntheticTokenizer()
    stops = GenerationConfig.from_pretrained(folder).eos_token_id
    assert stops == [tokenizer.eos_token_id, tokenizer.encode("<end_turn>")[0]]
    processor = MM1Processor.from_pretrained(folder)
    assert (
        type(processor.image_processor).__module__ == "mm1_megatron.hf_model.image_processing_mm1"
    )
    assert processor.num_image_tokens == configs["static"].model.connector.num_output_tokens
    with pytest.raises(ValueError, match="2 image markers but 1 images"):
        processor(text="<bos><user><image><image>", images=[torch.zeros(3, 8, 8)])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == PROCESSOR_AUTO_MAP["AutoProcessor"]
    assert all((tmp_path / name).is_file() for name in PROCESSOR_CODE_FILES)
    card = (folder / "README.md").read_text()
    assert "apply_chat_template" in card and "AutoProcessor" in card


def test_siglip_tower_reads_its_positions_resized_for_tiles(
    conversion_dir, megatron_single_process
):
    """A SigLIP-layout ViT (no class token) at 112 px tiles after 56 px pre-training."""
    from transformers import AutoModelForImageTextToText

    import mm1_megatron.hf_model.register  # noqa: F401
    from mm1_megatron.config import save_config
    from mm1_megatron.conversion import megatron_io
    from tests.conversion.hf_sources import randomize

    siglip = (
        "model.vision.use_class_token=false",
        "model.vision.patch_embedding_bias=true",
        "model.vision.pre_layernorm=false",
        "model.vision.post_layernorm=true",
        "model.vision.activation=gelu_tanh",
    )
    cfg = make_tiny_config(*EXPORTS["static"], *siglip)
    model = megatron_io.build_tp1_model(cfg.model, image_token_id=3, seed=12)
    randomize(model, seed=12)
    step = conversion_dir / "sft_siglip" / "step_00000000"
    megatron_io.save_parts(model, step, MODEL_PARTS)
    save_config(cfg, step / "config.yaml")
    megatron_io.write_published_checkpoint(step.parent, step.name)
    folder = export_to(step.parent, conversion_dir / "sft_siglip_hf")
    exported = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert exported.config.vision_config.model_type == "siglip_vision_model"
    tokens = torch.tensor([[1] + [3] * 8 + list(range(10, 20))])
    tiles = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(12))
    positions = torch.arange(tokens.shape[1])[None]
    with torch.no_grad():
        ours = model(tokens, positions, torch.zeros_like(positions), images=tiles)
        theirs = exported(input_ids=tokens, pixel_values=tiles).logits
    assert (ours - theirs).abs().max() <= TOLERANCE
