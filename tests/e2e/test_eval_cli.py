"""``mm1-eval`` end to end: a training checkpoint, official-format fixture files with
generated images, two data-parallel ranks, and the files it writes; ``--json`` and the
deprecated ``--output-dir`` in this process; and the input mistakes it must refuse before
generating anything. (The command line and config checks that need no weights:
``tests/evaluation/test_eval_plan.py``.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.evaluation.official_fixtures import EXPECTED_EVAL_IDS, write_official_fixtures
from tests.in_process import run_main, train_in_process
from tests.rank_pool import session_pools

pytestmark = pytest.mark.slow  # the checkpoint comes from a training run

OFFICIAL = ("coco_karpathy", "vqav2", "textvqa", "vizwiz")
TASKS = (*OFFICIAL, "synthetic_vqa")  # the synthetic tasks also run in test_eval_during_training
SHOTS = (0, 2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-step tiny run with a SentencePiece tokenizer (the official templates' words are
    not in the synthetic vocabulary)."""
    from mm1_megatron.data.tokenizers.base import build_vocabulary
    from mm1_megatron.data.tokenizers.text import train_sentencepiece

    root = tmp_path_factory.mktemp("eval_ckpt")
    words = " ".join(w for w in build_vocabulary() if not w.startswith("<"))
    corpus = [
        words,
        "Output: photo 42 caption 0",
        "Question: what is it? Short answer: answer 42000 other 7 unanswerable",
        "VizWiz val train 0 1 2 3 4 5 6 7 8 9",
    ] * 20
    model = train_sentencepiece(corpus, root / "sp", vocab_size=200)
    result = train_in_process(
        *TINY_OVERRIDES,
        "training.train_steps=2",
        "data.tokenizer.kind=sentencepiece",
        f"data.tokenizer.path={model}",
        f"checkpoint.save_dir={root / 'ckpt'}",
        "checkpoint.save_interval=2",
        f"logging.output_dir={root / 'run'}",
        "logging.tensorboard=false",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "ckpt"


def _eval(checkpoint: Path, output: Path, *args: str, nproc: int = 1):
    """``mm1 eval``: in this process for one rank, on the session's rank pool for more
    (as ``torchrun -m mm1_megatron.evaluation.cli`` runs it)."""
    argv = ["--checkpoint", str(checkpoint), "--output", str(output), *args]
    if nproc == 1:
        from mm1_megatron.evaluation.cli import main

        return run_main(main, argv)
    return session_pools()(nproc).command("mm1_megatron.evaluation.cli:main", argv)


def test_official_and_synthetic_tasks_on_two_ranks(checkpoint, tmp_path):
    paths = write_official_fixtures(tmp_path / "data", OFFICIAL)
    result = _eval(
        checkpoint,
        tmp_path / "eval",
        f"eval.tasks=[{', '.join(TASKS)}]",
        f"eval.shots=[{', '.join(map(str, SHOTS))}]",
        f"eval.task_paths={paths}",
        "eval.limit=6",
        "eval.max_new_tokens=4",
        "logging.tensorboard=true",  # the training run wrote none
        nproc=2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    document = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert document["step"] == 2 and document["protocol"]["version"]
    assert document["limit"] == 6 and document["decoding"]["max_new_tokens"] == 4
    assert set(document["tasks"]) == set(TASKS)
    for task in TASKS:
        entry = document["tasks"][task]
        assert set(entry["shots"]) == {str(s) for s in SHOTS}
        expected = len(EXPECTED_EVAL_IDS[task]) if task in OFFICIAL else 6
        for shots in SHOTS:
            cell = entry["shots"][str(shots)]
            assert cell["num_examples"] == expected
            assert 0.0 <= cell["score"] <= (10.0 if entry["metric"] == "cider" else 1.0)
            lines = (tmp_path / "eval" / "predictions" / f"{task}_{shots}shot.jsonl").read_text()
            records = [json.loads(line) for line in lines.splitlines()]
            assert len(records) == expected
            assert all(len(r["demos"]) == shots for r in records)
            if task in OFFICIAL:
                assert [r["id"] for r in records] == list(EXPECTED_EVAL_IDS[task])
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| task | metric | 0-shot | 2-shot |" in table
    assert all(f"| {task} |" in table for task in TASKS)
    assert any((tmp_path / "eval" / "tensorboard").iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["eval.tasks=[coco_karpaty]"],
            "unknown task 'coco_karpaty' (did you mean 'coco_karpathy'",
        ),
        (["eval.tasks=[synthetic_vqa]", "eval.shots=[600]"], "600 shots need"),
    ],
)
def test_bad_requests_are_refused_before_loading_the_model(
    checkpoint, tmp_path, args, message, capsys
):
    from mm1_megatron.evaluation.cli import main

    # In this process: the refusal comes before any distributed or model set-up.
    code = main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "eval"), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "eval" / "results.json").exists()


def test_a_missing_image_stops_the_run_unless_skipping_is_asked_for(checkpoint, tmp_path, capsys):
    paths = write_official_fixtures(tmp_path / "data", ["vqav2"])
    images = sorted((tmp_path / "data").rglob("COCO_val2014_000000000073.jpg"))
    assert images
    for image in images:
        image.unlink()
    from mm1_megatron.evaluation.cli import main

    stop = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "stop")]
    assert main([*stop, "eval.tasks=[vqav2]", f"eval.task_paths={paths}"]) == 2
    stderr = capsys.readouterr().err
    assert "COCO_val2014_000000000073.jpg" in stderr and "73000" in stderr
    assert not (tmp_path / "stop" / "results.json").exists()
    skipped = _eval(
        checkpoint,
        tmp_path / "skip",
        "eval.tasks=[vqav2]", f"eval.task_paths={paths}", "eval.on_bad=skip",
        "eval.max_new_tokens=2",
    )  # fmt: skip
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    document = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert document["tasks"]["vqav2"]["shots"]["0"]["num_examples"] == 2
    assert sum(document["skipped"]["vqav2"].values()) >= 1
    shutil.rmtree(tmp_path / "data")


def test_json_prints_one_object_and_output_dir_still_works(checkpoint, tmp_path, capsys, caplog):
    """In this process: ``--json`` puts the results document, and nothing else, on stdout;
    the deprecated ``--output-dir`` names the output folder, with a warning."""
    from mm1_megatron.evaluation.cli import main

    output = tmp_path / "eval"
    code = main(
        [
            "--checkpoint", str(checkpoint), "--output-dir", str(output), "--json",
            "eval.tasks=[synthetic_vqa]", "eval.limit=2", "eval.max_new_tokens=1",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "--output-dir is deprecated" in caplog.text  # logged while parsing
    assert captured.out.endswith("\n") and captured.out.count("\n") == 1, captured.out[:2000]
    printed = json.loads(captured.out)
    assert printed == json.loads((output / "results.json").read_text())
    assert printed["tasks"]["synthetic_vqa"]["shots"]["0"]["num_examples"] == 2
    assert (output / "predictions" / "synthetic_vqa_0shot.jsonl").is_file()
    assert not (output / "tensorboard").exists()  # logging.tensorboard=false in the run
