"""The evaluation task readers on tiny files in the official formats, and on bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from mm1_megatron.data.synthetic.world import caption_words
from mm1_megatron.evaluation.tasks import TASK_NAMES, TaskPaths, load_task, load_task_paths
from mm1_megatron.evaluation.tasks.synthetic import VQA_KINDS
from tests.evaluation.official_fixtures import (
    EXPECTED_DEMO_IDS,
    EXPECTED_EVAL_IDS,
    OFFICIAL_TASKS,
    answers_of,
    captions_of,
    write_official_fixtures,
)


@pytest.fixture(scope="module")
def fixture_yaml(tmp_path_factory) -> Path:
    return write_official_fixtures(tmp_path_factory.mktemp("official"))


@pytest.fixture
def fresh_yaml(tmp_path) -> Path:
    """A private copy of the fixtures, for tests that break them."""
    return write_official_fixtures(tmp_path)


def ids(examples):
    return tuple(example.example_id for example in examples)


def by_id(examples):
    return {example.example_id: example for example in examples}


@pytest.mark.parametrize("name", OFFICIAL_TASKS)
def test_every_reader_returns_the_expected_ids_in_order(fixture_yaml, name):
    task = load_task(name, fixture_yaml)
    assert ids(task.eval_examples) == EXPECTED_EVAL_IDS[name]
    assert ids(task.demo_examples) == EXPECTED_DEMO_IDS[name]
    assert task.skipped == {}
    assert (task.family, task.metric) in {("caption", "cider"), ("vqa", "vqa_accuracy")}
    for example in task.eval_examples + task.demo_examples:
        assert example.image.is_file()
        assert (example.question is None) == (task.family == "caption")


def test_karpathy_split_handling(fixture_yaml):
    root = fixture_yaml.parent
    task = load_task("coco_karpathy", fixture_yaml)
    example = by_id(task.eval_examples)["42"]
    assert example.references == tuple(captions_of(42))
    assert example.image == root / "coco/val2014/COCO_val2014_000000000042.jpg"
    demos = by_id(task.demo_examples)
    assert demos["9"].image == root / "coco/train2014/COCO_train2014_000000000009.jpg"
    assert demos["133"].image == root / "coco/val2014/COCO_val2014_000000000133.jpg"  # restval
    assert "74" not in demos and "74" not in by_id(task.eval_examples)  # Karpathy val


def test_coco_val2014_uses_train2014_for_demos(fixture_yaml):
    task = load_task("coco_val2014", fixture_yaml)
    assert by_id(task.eval_examples)["74"].references == tuple(captions_of(74))
    assert by_id(task.demo_examples)["30"].image.parent.name == "train2014"


def test_nocaps_demos_come_from_coco_karpathy_train(fixture_yaml):
    task = load_task("nocaps", fixture_yaml)
    assert (
        task.eval_examples[0].image
        == fixture_yaml.parent / "nocaps/validation/0013ea2087020901.jpg"
    )
    assert task.eval_examples[0].references == tuple(captions_of(0))
    assert task.demo_examples == load_task("coco_karpathy", fixture_yaml).demo_examples


def test_textcaps_one_example_per_image_with_all_references(fixture_yaml):
    task = load_task("textcaps", fixture_yaml)
    example = task.eval_examples[0]
    assert example.references == tuple(captions_of(example.example_id, 3))
    assert example.image == fixture_yaml.parent / f"textvqa/train_images/{example.example_id}.jpg"


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_coco_vqa_questions_answers_and_images(fixture_yaml, name):
    task = load_task(name, fixture_yaml)
    example = task.eval_examples[0]
    # OK-VQA: the processed ``answer`` fields, not ``raw_answer`` (the fixture adds an "s")
    assert example.references == tuple(answers_of(example.example_id))
    assert example.question == "what is in picture 42?"
    assert example.image.name == "COCO_val2014_000000000042.jpg"
    assert task.demo_examples[0].image.parent.name == "train2014"


def test_textvqa_and_vizwiz(fixture_yaml):
    textvqa = load_task("textvqa", fixture_yaml)
    first, second = textvqa.eval_examples[:2]
    assert first.image == second.image  # two questions about one image
    assert first.image.name == "a1b2c3d4e5f60718.jpg" and len(first.references) == 10
    vizwiz = load_task("vizwiz", fixture_yaml)
    example = vizwiz.eval_examples[1]
    assert example.references == ("unanswerable",) * 10
    assert example.image == fixture_yaml.parent / "vizwiz/val/VizWiz_val_00000001.jpg"


def test_limit_draws_a_seeded_subset_in_id_order(fixture_yaml):
    first = load_task("vqav2", fixture_yaml, limit=2, seed=3)
    assert len(first.eval_examples) == 2 and set(ids(first.eval_examples)) < {
        "42000",
        "42001",
        "73000",
    }
    assert sorted(ids(first.eval_examples), key=int) == list(ids(first.eval_examples))
    assert first.eval_examples == load_task("vqav2", fixture_yaml, limit=2, seed=3).eval_examples
    assert len(first.demo_examples) == 2  # demos are not limited


@pytest.mark.parametrize("name", ["synthetic_caption", "synthetic_vqa"])
def test_synthetic_tasks_are_deterministic_and_disjoint(name):
    task = load_task(name, limit=20)
    assert len(task.eval_examples) == 20
    assert task.eval_examples == load_task(name, limit=20).eval_examples
    assert task.eval_examples != load_task(name, limit=20, seed=1).eval_examples
    assert not set(ids(task.eval_examples)) & set(ids(task.demo_examples))
    assert not {e.image for e in task.eval_examples} & {e.image for e in task.demo_examples}
    assert len(load_task(name).eval_examples) == 200


def test_synthetic_caption_references_are_the_training_caption():
    for example in load_task("synthetic_caption", limit=10).eval_examples:
        assert example.references == (" ".join(caption_words(example.image)),)


def test_synthetic_vqa_answers_are_the_next_caption_word():
    task = load_task("synthetic_vqa", limit=40)
    prefix_lengths = set()
    for example in task.eval_examples + task.demo_examples[:40]:
        words, question = caption_words(example.image), example.question.split()
        assert words[: len(question)] == question
        assert example.references == (words[len(question)],) * 10
        prefix_lengths.add((len(question), question[-1]))
    assert {"there are", "there is"} & {e.question for e in task.eval_examples}
    assert len({(n, last) for n, last in prefix_lengths}) >= len(VQA_KINDS)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_missing_image_stops_naming_file_and_id(fresh_yaml):
    image = fresh_yaml.parent / "coco/val2014/COCO_val2014_000000000073.jpg"
    image.unlink()
    with pytest.raises(ValueError, match="73000") as error:
        load_task("vqav2", fresh_yaml)
    assert str(image) in str(error.value) and "1 bad entries" in str(error.value)


def test_skip_mode_counts_and_warns(fresh_yaml, caplog):
    (fresh_yaml.parent / "coco/val2014/COCO_val2014_000000000073.jpg").unlink()
    questions = fresh_yaml.parent / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
    _edit_json(questions, lambda d: d["questions"][1].pop("question"))
    with caplog.at_level(logging.WARNING):
        task = load_task("vqav2", fresh_yaml, on_bad="skip")
    assert ids(task.eval_examples) == ("42000",)
    assert task.skipped == {"eval: malformed entry": 1, "eval: missing image file": 1}
    assert "skipped 2 bad entries" in caplog.text


def test_malformed_entries_name_their_id_and_file(fresh_yaml):
    root = fresh_yaml.parent
    questions = root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"
    annotations = root / "vqav2/v2_mscoco_val2014_annotations.json"
    _edit_json(questions, lambda d: d["questions"][1].pop("question"))
    _edit_json(annotations, lambda d: d["annotations"][2].update(answers="yes"))
    _edit_json(questions, lambda d: d["questions"].append(dict(d["questions"][0], question_id=7)))
    with pytest.raises(ValueError) as error:
        load_task("vqav2", fresh_yaml)
    message = str(error.value)
    assert f"{questions}: entry with question_id 42001 has no key 'question'" in message
    assert f"{annotations}: entry with question_id 73000 has 'answers'" in message
    assert "question 7 has no annotation" in message and "3 bad entries" in message


def test_malformed_karpathy_and_vizwiz_entries(fresh_yaml):
    root = fresh_yaml.parent
    _edit_json(
        root / "coco/karpathy/dataset_coco.json",
        lambda d: d["images"][1]["sentences"][0].pop("raw"),
    )
    _edit_json(root / "coco/karpathy/dataset_coco.json", lambda d: d["images"][2].pop("split"))
    with pytest.raises(ValueError, match=r"cocoid 73 has a 'sentences' item that has no key 'raw'"):
        load_task("coco_karpathy", fresh_yaml)
    task = load_task("coco_karpathy", fresh_yaml, on_bad="skip")
    assert ids(task.eval_examples) == ("42",) and task.skipped == {"eval: malformed entry": 2}
    _edit_json(root / "vizwiz/Annotations/val.json", lambda d: d[0]["answers"].pop(0))  # 9: fine
    _edit_json(root / "vizwiz/Annotations/train.json", lambda d: d[1].update(question=3))
    with pytest.raises(ValueError, match="'VizWiz_train_00000001.jpg' has 'question' = 3"):
        load_task("vizwiz", fresh_yaml)
    assert len(load_task("vizwiz", fresh_yaml, on_bad="skip").eval_examples[0].references) == 9


def test_missing_files_and_keys_name_the_path_and_yaml_key(fresh_yaml):
    annotations = fresh_yaml.parent / "vqav2/v2_mscoco_val2014_annotations.json"
    annotations.unlink()
    with pytest.raises(ValueError, match="vqav2_val_annotations") as error:
        load_task("vqav2", fresh_yaml)
    assert str(annotations) in str(error.value)
    with pytest.raises(ValueError, match="has no key 'textvqa_val_json'"):
        load_task("textvqa", TaskPaths())
    shutil.rmtree(fresh_yaml.parent / "vizwiz/val")
    with pytest.raises(ValueError, match="'vizwiz_val_images'.* is not a folder"):
        load_task("vizwiz", fresh_yaml)
    (fresh_yaml.parent / "okvqa/mscoco_val2014_annotations.json").write_text("[]")
    with pytest.raises(ValueError, match="no top-level 'annotations' list"):
        load_task("okvqa", fresh_yaml)


def test_paths_yaml_keys_overrides_and_errors(fixture_yaml, tmp_path):
    paths = load_task_paths(fixture_yaml, {"vizwiz_val_json": str(tmp_path / "v.json")})
    assert paths.paths["vizwiz_val_images"] == fixture_yaml.parent / "vizwiz/val"
    assert paths.paths["vizwiz_val_json"] == tmp_path / "v.json"
    bad = tmp_path / "bad.yaml"
    bad.write_text("vqav2_val_question: x.json\n")
    with pytest.raises(ValueError, match="did you mean 'vqav2_val_questions'"):
        load_task_paths(bad)
    with pytest.raises(ValueError, match="on_bad"):
        load_task("vqav2", fixture_yaml, on_bad="ignore")


def test_unknown_task_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Did you mean 'vqav2'") as error:
        load_task("vqa2")
    assert all(name in str(error.value) for name in TASK_NAMES)
