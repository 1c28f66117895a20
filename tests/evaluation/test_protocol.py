"""The few-shot protocol: templates, demonstration draws and the prompts they make."""

from __future__ import annotations

import pytest

from mm1_megatron.data.tokenizers.base import SyntheticTokenizer
from mm1_megatron.evaluation.evaluator import DecodeSettings, clean_prediction, generation_config
from mm1_megatron.evaluation.prompting import PromptBuilder
from mm1_megatron.evaluation.protocol import (
    TEMPLATES,
    Protocol,
    Template,
    choose_demos,
    demo_answer,
    text_segments,
)
from mm1_megatron.evaluation.tasks import load_task
from mm1_megatron.evaluation.tasks.records import EvalExample
from tests.conftest import make_tiny_config

TOKENIZER = SyntheticTokenizer()


def _examples(n, prefix="d"):
    return [EvalExample(f"{prefix}{i}", None, (f"caption {i}", "other"), None) for i in range(n)]


def test_demonstrations_depend_on_the_query_and_seed_only():
    pool = _examples(50)
    query = EvalExample("q7", None, ("x",))
    first = choose_demos(pool, 4, seed=3, task_name="t", query=query)
    again = choose_demos(list(pool), 4, seed=3, task_name="t", query=query)
    assert [d.example_id for d in first] == [d.example_id for d in again]
    assert len({d.example_id for d in first}) == 4  # without replacement
    other_seed = choose_demos(pool, 4, seed=4, task_name="t", query=query)
    other_query = choose_demos(pool, 4, seed=3, task_name="t", query=EvalExample("q8", None, ()))
    assert [d.example_id for d in other_seed] != [d.example_id for d in first]
    assert [d.example_id for d in other_query] != [d.example_id for d in first]
    assert choose_demos(pool, 0, seed=3, task_name="t", query=query) == []


def test_more_shots_than_demonstrations_are_refused():
    with pytest.raises(ValueError, match="8 shots need 8 demonstrations.*has 5"):
        choose_demos(_examples(5), 8, seed=0, task_name="tiny", query=_examples(1, "q")[0])


def test_a_query_is_never_its_own_demonstration():
    pool = _examples(3)
    for query in pool:
        demos = choose_demos(pool + _examples(1, "x"), 3, seed=0, task_name="t", query=query)
        assert query.example_id not in [d.example_id for d in demos]


def test_openflamingo_templates_and_answers():
    vqa = EvalExample("1", None, ("two", "2", "two", "three"), "how many?")
    demo = EvalExample("2", None, ("yes", "no", "no"), "is it?")
    assert demo_answer(vqa, "vqa") == "two" and demo_answer(demo, "vqa") == "no"
    pieces = text_segments(TEMPLATES["vqa"], [demo], vqa, "vqa")
    assert pieces == [
        "",
        "Question: is it? Short answer: no\n",
        "Question: how many? Short answer:",
    ]
    caption = EvalExample("3", None, ("a dog .", "a cat ."))
    pieces = text_segments(TEMPLATES["caption"], [caption, caption], caption, "caption")
    assert pieces == ["", "Output: a dog .\n", "Output: a dog .\n", "Output:"]
    with pytest.raises(ValueError, match="exactly one <image>"):
        Template("Output: {answer}", "<image>Output:")


def test_prompts_hold_one_image_per_demonstration_and_query_preprocessed_as_in_training():
    cfg = make_tiny_config()
    builder = PromptBuilder(cfg, TOKENIZER)
    task = load_task("synthetic_caption", limit=3)
    query = task.eval_examples[0]
    demos = choose_demos(task.demo_examples, 2, seed=0, task_name=task.name, query=query)
    prompt = builder.build(TEMPLATES["synthetic_caption"], "caption", query, demos)
    n = cfg.model.connector.num_output_tokens
    assert prompt.images.shape == (3, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    assert prompt.token_ids.count(TOKENIZER.image_token_id) == 3 * n
    assert prompt.token_ids[0] == TOKENIZER.bos_token_id
    assert prompt.token_ids[-n:] == [TOKENIZER.image_token_id] * n  # the query's image last
    words = TOKENIZER.decode(prompt.token_ids).split()
    assert " ".join(w for w in words if w != "<image>")[6:] == (
        demos[0].references[0] + " " + demos[1].references[0]
    )
    # Normalised with the encoder's mean and std, like the synthetic training images.
    assert prompt.images.min() < 0


def test_generation_settings_per_family_and_cleanup():
    settings = DecodeSettings()
    caption = generation_config("caption", settings, TOKENIZER)
    assert caption.num_beams == 3 and caption.max_new_tokens == 20
    assert TOKENIZER.eos_token_id in caption.stop_token_ids
    assert TOKENIZER.image_token_id in caption.banned_token_ids
    vqa = generation_config("synthetic_vqa", DecodeSettings(num_beams=2), TOKENIZER)
    assert vqa.num_beams == 2 and vqa.max_new_tokens == 1
    assert clean_prediction("  a red circle \nQuestion: next") == "a red circle"


def test_protocol_is_recorded_with_its_version():
    described = Protocol(seed=5).describe()
    assert described["version"].startswith("mm1-fewshot-") and described["seed"] == 5
    assert set(described["templates"]) >= {"caption", "vqa"}
