"""Generation with the KV cache against the model run on the whole sequence per token.

The reference decodes each prompt alone, unpadded, by running the full model on prompt +
tokens so far and taking the argmax of the last position: no cache, no padding, no
batching. Cached, batched, left-padded generation must give the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mm1_megatron.batch import run_model
from mm1_megatron.batch.contract import expand_image_placeholders
from mm1_megatron.data.synthetic.world import draw_scene, random_scene
from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from mm1_megatron.inference import GenerationConfig, Prompt, generate
from mm1_megatron.inference.search import BeamSearch
from tests.conftest import make_tiny_config

TOKENIZER = SyntheticTokenizer()


def _prompts(cfg, count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    words = ["there", "are", "two", "shapes", "on", "a", "gray", "background", ":"]
    prompts = []
    for i in range(count):
        num_images = i % 3  # 0, 1 or 2 images
        ids = [TOKENIZER.bos_token_id]
        for _ in range(num_images):
            ids += [TOKENIZER.image_token_id] + TOKENIZER.encode(" ".join(words[: 1 + i % 4]))
        ids += TOKENIZER.encode(" ".join(words[: 2 + (i * 3) % 7]))
        ids = expand_image_placeholders(
            ids,
            image_token_id=TOKENIZER.image_token_id,
            num_image_tokens=cfg.model.connector.num_output_tokens,
        )
        size = cfg.model.vision.image_size
        images = [draw_scene(random_scene(rng), size) for _ in range(num_images)]
        images = torch.stack(images) if images else torch.empty(0, 3, size, size)
        prompts.append(Prompt(token_ids=ids, images=images))
    return prompts


def _full_forward_logits(model, prompt: Prompt, ids) -> torch.Tensor:
    """The last position's logits of the whole sequence, one prompt, no cache (packed
    patches with their grids for a native-resolution model)."""
    tokens = torch.tensor([ids])
    inputs = {
        "tokens": tokens,
        "position_ids": torch.arange(len(ids))[None],
        "document_ids": torch.zeros_like(tokens),
        "images": prompt.images,
    }
    if prompt.image_grids is not None:
        inputs["image_grids"] = prompt.image_grids
    return run_model(model, inputs, with_labels=False)[0, -1]


def _reference_greedy(model, prompt: Prompt, config: GenerationConfig):
    """Unbatched, unpadded, uncached: the whole sequence through the model per token."""
    ids = list(prompt.token_ids)
    out = []
    for _ in range(config.max_new_tokens):
        logits = _full_forward_logits(model, prompt, ids).clone()
        logits[list(config.banned_token_ids)] = float("-inf")
        token = int(logits.argmax())
        if token in config.stop_token_ids:
            break
        out.append(token)
        ids.append(token)
    return out


# Qwen3's attention (q/k norms, 4 heads of 12 in a 32-wide decoder): the KV cache holds
# heads of head_dim, not hidden / heads.
QWEN3 = ("model.llm.qk_norm=true", "model.llm.head_dim=12")


@pytest.fixture(params=[(), QWEN3], ids=["llama_attention", "qwen3_attention"])
def tiny_model(request, build_tiny_model):
    cfg = make_tiny_config(
        "model.llm.max_sequence_length=256", "training.seq_length=256", *request.param
    )
    model = build_tiny_model(cfg)
    model.eval()
    return cfg, model


def _config(**kwargs):
    defaults = dict(
        max_new_tokens=8,
        stop_token_ids=(TOKENIZER.eos_token_id,),
        banned_token_ids=(TOKENIZER.image_token_id, TOKENIZER.pad_token_id),
    )
    return GenerationConfig(**{**defaults, **kwargs})


def test_cached_batched_greedy_equals_full_recompute_per_prompt(tiny_model):
    cfg, model = tiny_model
    prompts = _prompts(cfg, 6)
    assert len({len(p.token_ids) for p in prompts}) > 1  # padding really happens
    config = _config()
    outputs = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    expected = [_reference_greedy(model, p, config) for p in prompts]
    assert outputs == expected
    assert any(len(o) == config.max_new_tokens for o in outputs)


def test_prompts_of_one_length_decode_without_a_mask_as_by_full_recompute(tiny_model):
    """No padding: the decode steps attend without a mask (``runner.ALL_VISIBLE``)."""
    cfg, model = tiny_model
    rng = np.random.default_rng(5)
    words = TOKENIZER.encode("there are two shapes on a gray background :")
    prompts = []
    for _ in range(3):
        ids = [TOKENIZER.bos_token_id, TOKENIZER.image_token_id] + rng.permutation(words).tolist()
        ids = expand_image_placeholders(
            ids,
            image_token_id=TOKENIZER.image_token_id,
            num_image_tokens=cfg.model.connector.num_output_tokens,
        )
        image = draw_scene(random_scene(rng), cfg.model.vision.image_size)[None]
        prompts.append(Prompt(token_ids=ids, images=image))
    config = _config(max_new_tokens=6)
    outputs = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    assert outputs == [_reference_greedy(model, p, config) for p in prompts]


def test_a_stop_token_ends_a_row_and_is_not_returned(tiny_model):
    cfg, model = tiny_model
    prompts = _prompts(cfg, 3)
    free = generate(model, prompts, _config(), pad_token_id=TOKENIZER.pad_token_id)
    stop = free[0][2]  # make the third token of the first output a stop token
    config = _config(stop_token_ids=(stop,))
    stopped = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    assert stopped == [_reference_greedy(model, p, config) for p in prompts]
    assert stopped[0] == free[0][: free[0].index(stop)]


def test_one_beam_is_greedy(tiny_model):
    cfg, model = tiny_model
    prompts = _prompts(cfg, 4)
    greedy = generate(model, prompts, _config(), pad_token_id=TOKENIZER.pad_token_id)
    one_beam = generate(model, prompts, _config(num_beams=1), pad_token_id=TOKENIZER.pad_token_id)
    assert one_beam == greedy


def _exhaustive_best(logprob_fn, vocab, length, stop_ids):
    """Best-scoring sequence of at most ``length`` tokens (stop ends it), by enumeration."""
    best = (float("-inf"), None)

    def walk(prefix, score):
        nonlocal best
        if len(prefix) == length:
            best = max(best, (score, tuple(prefix)))
            return
        logprobs = logprob_fn(prefix)
        for token in range(vocab):
            if token in stop_ids:
                best = max(best, (score + logprobs[token], tuple(prefix)))
            else:
                walk(prefix + [token], score + logprobs[token])

    walk([], 0.0)
    return list(best[1])


def test_beam_search_as_wide_as_the_tree_finds_the_exhaustive_optimum():
    vocab, length, stop = 4, 3, {3}
    torch.manual_seed(0)
    table = {}

    def logprob_fn(prefix):
        key = tuple(prefix)
        if key not in table:
            table[key] = torch.log_softmax(torch.randn(vocab, dtype=torch.float64), -1).tolist()
        return table[key]

    for trial in range(5):
        table.clear()
        torch.manual_seed(trial)
        search = BeamSearch(1, vocab**length, stop_ids=stop, banned_ids=(), pad_id=0)
        for _ in range(length):
            rows = [search.beams[r] for r in range(search.rows)]
            logprobs = torch.tensor([logprob_fn(r) for r in rows], dtype=torch.float64)
            _, _, done = search.step(logprobs)
            if done:
                break
        assert search.results()[0] == _exhaustive_best(logprob_fn, vocab, length, stop)


def test_cached_beam_search_equals_beam_search_by_full_recompute(tiny_model):
    cfg, model = tiny_model
    prompts = _prompts(cfg, 3)
    config = _config(num_beams=3, max_new_tokens=6)
    cached = generate(model, prompts, config, pad_token_id=TOKENIZER.pad_token_id)
    for prompt, output in zip(prompts, cached):
        search = BeamSearch(
            1, 3, stop_ids=config.stop_token_ids, banned_ids=config.banned_token_ids, pad_id=0
        )
        for _ in range(config.max_new_tokens):
            rows = []
            for beam in search.beams:
                ids = torch.tensor([prompt.token_ids + beam])
                inputs = {
                    "tokens": ids,
                    "position_ids": torch.arange(ids.shape[1])[None],
                    "document_ids": torch.zeros_like(ids),
                    "images": prompt.images,
                }
                rows.append(run_model(model, inputs, with_labels=False)[0, -1])
            logprobs = torch.log_softmax(torch.stack(rows).double(), -1)
            if search.step(logprobs)[2]:
                break
        assert output == search.results()[0]
