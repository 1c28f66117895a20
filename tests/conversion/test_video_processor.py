"""The exported processor takes videos: ``MM1Processor(text="<video> ...", videos=[frames])``
gives the token ids and pixels our evaluation builds for the same clip (frame markers as
training wrote them), frames and images in marker order, and refuses mismatched input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mm1_megatron.config import load_config
from mm1_megatron.conversion.mm1_processor import processor_config
from mm1_megatron.conversion.target_configs import image_processor_config
from mm1_megatron.conversion.tokenizer_files import _synthetic_tokenizer_fast
from mm1_megatron.data.synthetic.world import draw_scene
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from mm1_megatron.evaluation.prompting import PromptBuilder
from mm1_megatron.evaluation.protocol import Protocol
from mm1_megatron.evaluation.tasks import load_task
from mm1_megatron.hf_model.processing_mm1 import MM1Processor
from tests.conftest import CONFIG_DIR

CFG = load_config(CONFIG_DIR / "debug_video.yaml")
TOKENIZER = SyntheticTokenizer()


def _processor(cfg=CFG) -> MM1Processor:
    from transformers import CLIPImageProcessor

    settings = image_processor_config(cfg.model.vision)
    settings.pop("image_processor_type")
    options = processor_config(cfg)
    for key in ("processor_class", "auto_map"):
        options.pop(key)
    tokenizer = _synthetic_tokenizer_fast(TOKENIZER)
    return MM1Processor(CLIPImageProcessor(**settings), tokenizer, **options)


def _frames(clip):
    """The clip's frames as 8-bit images, as a video file would hold them."""
    size = CFG.model.vision.image_size
    frames = [draw_scene(f, size).mul(255).round().to(torch.uint8) for f in clip.frames]
    return [Image.fromarray(f.permute(1, 2, 0).numpy()) for f in frames]


# The synthetic colours (0.5, 0.55, ...) are not all whole 8-bit levels: half a level,
# normalised by the smallest std.
EIGHT_BIT = 0.5 / 255 / min(CFG.model.vision.image_std) + 1e-5


def test_a_clip_reads_as_our_evaluation_prompts_it():
    task = load_task("synthetic_video_qa", limit=3)
    protocol = Protocol()
    template = protocol.templates[protocol.template_key(task.name, task.family)]
    builder = PromptBuilder(CFG, TOKENIZER)
    processor = _processor()
    for query in task.eval_examples:
        ours = builder.build(template, task.family, query, [])
        batch = processor(
            text=f"<bos> <video> {query.question}",
            videos=[_frames(query.image)],
            return_tensors="pt",
        )
        assert batch["input_ids"][0].tolist() == ours.token_ids
        assert "time three : <image>" in TOKENIZER.decode(ours.token_ids)
        torch.testing.assert_close(batch["pixel_values"], ours.images, atol=EIGHT_BIT, rtol=0)
        assert batch["num_tiles"].tolist() == [1] * len(query.image.frames)


def test_images_and_frames_follow_their_markers():
    task = load_task("synthetic_video_qa", limit=1)
    clip = task.eval_examples[0].image
    frames = _frames(clip)
    still = Image.new("RGB", (48, 48), (255, 0, 0))
    processor = _processor()
    batch = processor(
        text="<bos> <image> here is a <video> next , another <image> picture",
        images=[still, still],
        videos=[frames],
        return_tensors="pt",
    )
    red = processor.image_processor([still], return_tensors="pt")["pixel_values"][0]
    pixels = batch["pixel_values"]
    assert pixels.shape[0] == 2 + len(frames)
    torch.testing.assert_close(pixels[0], red)
    torch.testing.assert_close(pixels[-1], red)
    clip_only = processor(text="<bos> <video>", videos=[frames], return_tensors="pt")
    torch.testing.assert_close(pixels[1:-1], clip_only["pixel_values"])
    # A [T, 3, H, W] uint8 tensor (what a decoder returns, stacked) is the same clip.
    stacked = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames])
    as_tensor = processor(text="<bos> <video>", videos=[stacked], return_tensors="pt")
    assert torch.equal(as_tensor["pixel_values"], clip_only["pixel_values"])
    per_image = CFG.model.connector.num_output_tokens
    assert batch["input_ids"][0].tolist().count(TOKENIZER.image_token_id) == per_image * 6


def test_frame_markers_are_digits_for_a_real_tokenizer_and_words_for_the_synthetic_one():
    processor = _processor()
    assert processor.frame_marker(2) == "time two :"
    with pytest.raises(ValueError, match="whole seconds 0 to 20"):
        processor.frame_marker(1.5)
    digits = MM1Processor.__new__(MM1Processor)
    digits.frame_time_words = None
    assert [digits.frame_marker(t) for t in (0.5, 12.04, 3)] == [
        "time 0.5 :",
        "time 12 :",
        "time 3 :",
    ]
    # As `mm1 data shards videos` writes them.
    from mm1_megatron.data.shards.video_records import frame_marker

    assert all(digits.frame_marker(t) == frame_marker(t) for t in (0.25, 1.0, 7.66, 30))


def test_mismatched_videos_are_refused():
    processor = _processor()
    frames = _frames(load_task("synthetic_video_qa", limit=1).eval_examples[0].image)
    with pytest.raises(ValueError, match="1 <video> markers but 0 videos"):
        processor(text="<bos> <video>", return_tensors="pt")
    with pytest.raises(ValueError, match="0 <video> markers but 1 videos"):
        processor(text="<bos> no video", videos=[frames], return_tensors="pt")
    with pytest.raises(ValueError, match="4 frames and 3 timestamps"):
        processor(text="<video>", videos=[frames], video_timestamps=[[0, 1, 2]])
    with pytest.raises(ValueError, match="not audio"):
        processor(text="<video>", videos=[frames], audio=[0.0])


def test_the_video_settings_survive_saving_and_loading(tmp_path):
    import json

    processor = _processor()
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["video_token"] == "<video>" and saved["frame_time_words"][:3] == [
        "zero",
        "one",
        "two",
    ]
    loaded = MM1Processor.from_pretrained(tmp_path)
    assert loaded.frame_marker(3) == "time three :" and loaded.video_token == "<video>"
