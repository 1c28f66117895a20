"""Demonstrations by image similarity: the ranking against a brute-force cosine search,
and the features against the model's encoder run by hand."""

from __future__ import annotations

import numpy as np
import torch

from mm1_megatron.data.synthetic.world import random_scene
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from mm1_megatron.evaluation.prompting import PromptBuilder
from mm1_megatron.evaluation.retrieval import image_features, most_similar
from mm1_megatron.evaluation.tasks.records import EvalExample
from tests.conftest import make_tiny_config


def test_ranking_equals_a_brute_force_cosine_search():
    rng = np.random.default_rng(0)
    pool = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(40, 8))), dim=-1)
    queries = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(5, 8))), dim=-1)
    ranked = most_similar(queries, pool, 6)
    for query, row in zip(queries.numpy(), ranked):
        cosines = [
            float(np.dot(query, p) / np.linalg.norm(query) / np.linalg.norm(p))
            for p in pool.numpy()
        ]
        assert row == sorted(range(40), key=lambda i: -cosines[i])[:6]


def test_features_are_the_normalised_mean_connector_tokens_and_find_the_same_image(
    build_tiny_model,
):
    cfg = make_tiny_config()
    model = build_tiny_model(cfg).eval()
    builder = PromptBuilder(cfg, SyntheticTokenizer())
    rng = np.random.default_rng(3)
    scenes = [random_scene(rng) for _ in range(12)]
    pool = [EvalExample(f"d{i}", scene, ("x",)) for i, scene in enumerate(scenes)]
    queries = [EvalExample("q0", scenes[7], ("x",)), EvalExample("q1", scenes[2], ("x",))]
    features = image_features(model, pool, builder.image, batch_size=5)
    with torch.no_grad():
        images = torch.stack([builder.image(ex) for ex in pool])
        by_hand = torch.nn.functional.normalize(model.encode_images(images).mean(dim=1), dim=-1)
    torch.testing.assert_close(features, by_hand.float(), rtol=1e-5, atol=1e-6)
    ranked = most_similar(image_features(model, queries, builder.image), features, 3)
    assert ranked[0][0] == 7 and ranked[1][0] == 2  # the identical image comes first
