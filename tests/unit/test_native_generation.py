"""Generation on a native-resolution model (SigLIP 2 NaFlex): prompts carry packed patches
and their grids, batches keep them in image order, and cached, batched, left-padded
generation gives the tokens of the model run on the whole sequence per token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm1_megatron.batch.contract import expand_image_placeholders
from mm1_megatron.data.pipeline.native_resolution import (
    native_resolution_of,
    normalise_native_images,
)
from mm1_megatron.data.synthetic.sequences import native_image_sizes
from mm1_megatron.data.synthetic.world import draw_scene, random_scene
from mm1_megatron.inference import Prompt, generate
from mm1_megatron.inference.prompts import left_pad
from mm1_megatron.inference.search import BeamSearch
from tests.conftest import NATIVE_OVERRIDES, make_tiny_config
from tests.unit.test_generation import (
    TOKENIZER,
    _config,
    _full_forward_logits,
    _reference_greedy,
)

WORDS = ["there", "are", "two", "shapes", "on", "a", "gray", "background", ":"]


def _native_prompts(cfg, count: int, seed: int = 0):
    """``count`` prompts with 0 to 3 images, each image at one of the synthetic world's
    aspect ratios (several grids per prompt), and text of different lengths."""
    rng = np.random.default_rng(seed)
    vision = cfg.model.vision
    native = native_resolution_of(vision)
    sizes = native_image_sizes(vision.image_size, native)
    prompts = []
    for i in range(count):
        num_images = i % 4
        ids = [TOKENIZER.bos_token_id]
        for _ in range(num_images):
            ids += [TOKENIZER.image_token_id] + TOKENIZER.encode(" ".join(WORDS[: 1 + i % 4]))
        ids += TOKENIZER.encode(" ".join(WORDS[: 2 + (i * 3) % 7]))
        ids = expand_image_placeholders(
            ids,
            image_token_id=TOKENIZER.image_token_id,
            num_image_tokens=cfg.model.connector.num_output_tokens,
        )
        drawn = [
            draw_scene(random_scene(rng), sizes[(i + j) % len(sizes)]) for j in range(num_images)
        ]
        patches, grids = normalise_native_images(drawn, native, vision.image_mean, vision.image_std)
        prompts.append(Prompt(token_ids=ids, images=patches, image_grids=grids))
    return prompts


@pytest.fixture(scope="module")
def native_model(megatron_single_process):
    from mm1_megatron.models import build_mm1_model
    from mm1_megatron.parallel import seed_everything

    cfg = make_tiny_config(
        *NATIVE_OVERRIDES, "model.llm.max_sequence_length=256", "training.seq_length=256"
    )
    seed_everything(1234)
    model = build_mm1_model(cfg.model, cfg.parallel, image_token_id=TOKENIZER.image_token_id)
    return cfg, model.eval()


def test_the_prompts_mix_aspect_ratios_lengths_and_image_counts(native_model):
    cfg, _ = native_model
    prompts = _native_prompts(cfg, 6)
    grids = {tuple(g) for p in prompts for g in p.image_grids.tolist()}
    assert len(grids) >= 4, grids
    assert len({len(p.token_ids) for p in prompts}) > 1  # padding really happens
    assert {p.num_images for p in prompts} == {0, 1, 2, 3}


def test_cached_batched_greedy_equals_full_recompute_per_prompt(native_model):
    cfg, model = native_model
    prompts = _native_prompts(cfg, 6)
    config = _config()
    outputs = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    assert outputs == [_reference_greedy(model, p, config) for p in prompts]
    assert any(len(o) == config.max_new_tokens for o in outputs)


def test_cached_beam_search_equals_beam_search_by_full_recompute(native_model):
    """Beams copy each prompt's cache rows after the prefill: the images, encoded once,
    stay with their prompt."""
    cfg, model = native_model
    prompts = _native_prompts(cfg, 4, seed=1)[1:]  # each with images
    config = _config(num_beams=3, max_new_tokens=4)
    cached = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    for prompt, output in zip(prompts, cached):
        search = BeamSearch(
            1, 3, stop_ids=config.stop_token_ids, banned_ids=config.banned_token_ids, pad_id=0
        )
        for _ in range(config.max_new_tokens):
            rows = [_full_forward_logits(model, prompt, prompt.token_ids + b) for b in search.beams]
            if search.step(torch.log_softmax(torch.stack(rows).double(), -1))[2]:
                break
        assert output == search.results()[0]


def test_a_batch_holds_every_prompt_s_patches_and_grids_in_row_order(native_model):
    cfg, _ = native_model
    prompts = _native_prompts(cfg, 5)
    batch = left_pad(prompts, pad_token_id=TOKENIZER.pad_token_id)
    with_images = [p for p in prompts if p.num_images]
    assert torch.equal(batch.images, torch.cat([p.images for p in with_images]))
    assert torch.equal(batch.image_grids, torch.cat([p.image_grids for p in with_images]))
    assert batch.image_grids.prod(dim=1).sum() == batch.images.shape[0]
    image_positions = int((batch.tokens == TOKENIZER.image_token_id).sum())
    assert image_positions == cfg.model.connector.num_output_tokens * batch.image_grids.shape[0]


def test_prompts_refuse_patches_that_do_not_match_their_grids_or_mix_with_squares(native_model):
    cfg, _ = native_model
    packed = _native_prompts(cfg, 2)[1]
    with pytest.raises(ValueError, match="image_grids"):
        Prompt(token_ids=[1], images=packed.images[1:], image_grids=packed.image_grids)
    with pytest.raises(ValueError, match=r"\[n, 2\]"):
        Prompt(token_ids=[1], images=packed.images, image_grids=packed.image_grids[0])
    square = Prompt(token_ids=[1], images=torch.zeros(1, 3, 56, 56))
    with pytest.raises(ValueError, match="model.vision.native_resolution"):
        left_pad([packed, square], pad_token_id=TOKENIZER.pad_token_id)
