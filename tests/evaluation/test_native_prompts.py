"""Few-shot prompts for a native-resolution model (SigLIP 2 NaFlex): each image resized by
the training pipeline's size rule and packed into patches with its grid, so evaluation
sees exactly the pixels training would: files as the shard pipeline decodes them,
synthetic scenes as the synthetic world draws them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm1_megatron.data.build import build_run_data
from mm1_megatron.data.pipeline.native_resolution import (
    native_resolution_of,
    normalise_native_images,
)
from mm1_megatron.data.shards.ingest import coco_items
from mm1_megatron.data.shards.writer import build_shards
from mm1_megatron.data.synthetic.sequences import native_image_sizes
from mm1_megatron.data.synthetic.world import draw_scene, random_scene
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from mm1_megatron.evaluation.prompting import PromptBuilder
from mm1_megatron.evaluation.protocol import TEMPLATES, choose_demos
from mm1_megatron.evaluation.retrieval import image_features
from mm1_megatron.evaluation.tasks import load_task
from mm1_megatron.evaluation.tasks.records import EvalExample
from tests.conftest import NATIVE_OVERRIDES, make_tiny_config
from tests.data.corpus_fixtures import make_coco

TOKENIZER = SyntheticTokenizer()


def _split(patches: torch.Tensor, grids: torch.Tensor):
    """A packed tensor's images: ``[(grid, patches)]``."""
    counts = grids.prod(dim=1).tolist()
    return list(zip(map(tuple, grids.tolist()), patches.split(counts)))


def test_eval_tasks_are_accepted_with_native_resolution():
    cfg = make_tiny_config(*NATIVE_OVERRIDES, "eval.interval=10", "eval.tasks=[synthetic_vqa]")
    assert cfg.eval.tasks == ["synthetic_vqa"] and cfg.model.vision.native_resolution


def test_a_file_s_patches_are_the_training_pipeline_s(tmp_path):
    """The same image files through the shard pipeline of a training run (decoder, size
    rule, packing) and through the prompt builder: the same patches, bit for bit."""
    captions, folder = make_coco(tmp_path / "coco", 6)
    build_shards(
        coco_items(captions, folder),
        tmp_path / "shards",
        kind="caption",
        samples_per_shard=3,
        input_id="t",
        progress=False,
    )
    cfg = make_tiny_config(
        *NATIVE_OVERRIDES,
        "data.source=webdataset",
        "data.mixture={caption: 1.0}",
        f"data.shards.caption=[{tmp_path / 'shards'}]",
        "training.seq_length=256",
        "model.llm.max_sequence_length=256",
    )
    loader, _ = build_run_data(cfg)
    batches = [next(loader) for _ in range(3)]
    trained = [image for b in batches for image in _split(b["images"], b["image_grids"])]
    assert len({grid for grid, _ in trained}) > 1
    builder = PromptBuilder(cfg, TOKENIZER)
    files = [EvalExample(path.name, path, ("x",)) for path in sorted(folder.iterdir())]
    evaluated = _split(*builder.pack([builder.image(example) for example in files]))
    assert len({grid for grid, _ in evaluated}) > 1  # the files have several aspect ratios
    for grid, patches in trained:
        assert any(g == grid and torch.equal(p, patches) for g, p in evaluated), grid
    loader.close()


def test_a_scene_is_drawn_at_a_training_size_and_normalised_as_in_training():
    cfg = make_tiny_config(*NATIVE_OVERRIDES)
    vision = cfg.model.vision
    native = native_resolution_of(vision)
    sizes = native_image_sizes(vision.image_size, native)
    builder = PromptBuilder(cfg, TOKENIZER)
    rng = np.random.default_rng(0)
    drawn_at = set()
    for index in range(20):
        scene = random_scene(rng)
        image = builder.image(EvalExample(str(index), scene, ("x",)))
        size = tuple(image.shape[1:])
        assert size in sizes
        drawn_at.add(size)
        training, _ = normalise_native_images(
            [draw_scene(scene, size)], native, vision.image_mean, vision.image_std
        )
        assert torch.equal(builder.pack([image])[0], training)
        # The size comes from the scene alone: every rank and run draws it alike.
        assert torch.equal(builder.image(EvalExample("other id", scene, ("x",))), image)
    assert len(drawn_at) >= 3, drawn_at


def test_prompts_carry_each_image_s_patches_and_grid_in_order():
    cfg = make_tiny_config(*NATIVE_OVERRIDES)
    builder = PromptBuilder(cfg, TOKENIZER)
    task = load_task("synthetic_caption", limit=3)
    query = task.eval_examples[0]
    demos = choose_demos(task.demo_examples, 2, seed=0, task_name=task.name, query=query)
    prompt = builder.build(TEMPLATES["synthetic_caption"], "caption", query, demos)
    native = native_resolution_of(cfg.model.vision)
    assert prompt.image_grids.shape == (3, 2)
    assert prompt.images.shape == (int(prompt.image_grids.prod(dim=1).sum()), native.patch_width)
    n = cfg.model.connector.num_output_tokens
    assert prompt.token_ids.count(TOKENIZER.image_token_id) == 3 * n
    for example, (grid, patches) in zip([*demos, query], _split(prompt.images, prompt.image_grids)):
        alone, alone_grid = builder.pack([builder.image(example)])
        assert [grid] == [tuple(g) for g in alone_grid.tolist()]
        assert torch.equal(patches, alone)


@pytest.mark.parametrize("batch_size", [32, 5])
def test_retrieval_features_of_a_native_model_are_its_mean_connector_tokens(
    build_tiny_model, batch_size
):
    cfg = make_tiny_config(*NATIVE_OVERRIDES)
    model = build_tiny_model(cfg).eval()
    builder = PromptBuilder(cfg, TOKENIZER)
    rng = np.random.default_rng(3)
    pool = [EvalExample(f"d{i}", random_scene(rng), ("x",)) for i in range(8)]
    features = image_features(model, pool, builder.image, batch_size, pack=builder.pack)
    with torch.no_grad():
        patches, grids = builder.pack([builder.image(example) for example in pool])
        tokens = model.encode_images(patches, grids).mean(dim=1)
    by_hand = torch.nn.functional.normalize(tokens, dim=-1)
    torch.testing.assert_close(features, by_hand.float(), rtol=1e-5, atol=1e-6)
