"""``mm1 eval``'s command line and config, and the one ``EvalPlan`` it shares with evaluation
during training: config files merged in order, overrides validated with the training
config's messages (exit 2), ``--output-dir`` as a deprecated alias, and equal plans from
the same config. In this process, on a checkpoint folder holding only its ``config.yaml``:
every check here comes before any weight is read."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

import pytest
import yaml

from mm1_megatron.config import load_config, save_config, validate_config
from mm1_megatron.evaluation import cli
from mm1_megatron.evaluation.plan import EvalPlan
from tests.conftest import DEBUG_CONFIG, TINY_OVERRIDES, make_tiny_config

EVAL = (
    "eval.tasks=[synthetic_vqa, synthetic_caption]",
    "eval.shots=[0, 1]",
    "eval.limit=4",
    "eval.batch_size=3",
    "eval.max_new_tokens=2",
    "eval.num_beams=2",
    "eval.seed=5",
    "eval.demo_selection=similar",
    "eval.text_demos_at_zero=true",
    "eval.vqa_mode=openflamingo",
)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """What ``mm1-eval`` reads before the weights: a step folder with its ``config.yaml``
    (the tiny debug model, the default ``eval`` section)."""
    folder = tmp_path / "ckpt" / "step_00000002"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text("{}")
    save_config(make_tiny_config(), folder / "config.yaml")
    return folder


def _yaml(path: Path, tree) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _args(checkpoint: Path, *rest: str):
    return cli.parse_args(["--checkpoint", str(checkpoint), "--output", "unused", *rest])


def test_config_files_merge_left_to_right_then_overrides(checkpoint, tmp_path):
    a = _yaml(tmp_path / "a.yaml", {"eval": {"tasks": ["synthetic_vqa"], "shots": [0, 1]}})
    b = _yaml(tmp_path / "b.yaml", {"eval": {"shots": [2], "batch_size": 3, "limit": 5}})
    _, plan = cli.configure(_args(checkpoint, "--config", a, "--config", b, "eval.limit=7"))
    assert plan.tasks == ("synthetic_vqa",)  # from a, which b leaves alone
    assert plan.shots == (2,)  # b over a
    assert plan.decoding.batch_size == 3
    assert plan.limit == 7  # the override over both
    _, swapped = cli.configure(_args(checkpoint, "--config", b, "--config", a))
    assert swapped.shots == (0, 1) and swapped.limit == 5


def test_overrides_may_come_before_between_and_after_the_flags(checkpoint, tmp_path):
    argv = [
        "eval.tasks=[synthetic_vqa]", "--checkpoint", str(checkpoint), "eval.limit=3",
        "--output", str(tmp_path), "eval.shots=[0, 2]", "--json",
    ]  # fmt: skip
    args = cli.parse_args(argv)
    assert args.json and args.output == tmp_path
    _, plan = cli.configure(args)
    assert (plan.tasks, plan.limit, plan.shots) == (("synthetic_vqa",), 3, (0, 2))


def test_the_checkpoint_config_is_the_first_file(checkpoint, tmp_path):
    """The run's own eval section is the base; the model is the checkpoint's."""
    ckpt_file = checkpoint / "config.yaml"
    save_config(make_tiny_config("eval.tasks=[synthetic_caption]", "eval.limit=9"), ckpt_file)
    layout = _yaml(tmp_path / "layout.yaml", {"parallel": {"tensor_parallel_size": 2}})
    cfg, plan = cli.configure(_args(checkpoint, "--config", layout))
    # The run's subset size is not this command's: every example unless said here.
    assert plan.tasks == ("synthetic_caption",) and plan.limit is None
    assert cfg.parallel.tensor_parallel_size == 2
    assert cfg.model == load_config(ckpt_file).model
    assert cli.configure(_args(checkpoint, "eval.limit=5"))[1].limit == 5
    limit_file = _yaml(tmp_path / "limit.yaml", {"eval": {"limit": 7}})
    assert cli.configure(_args(checkpoint, "--config", limit_file))[1].limit == 7


def test_the_draw_seed_is_the_runs_unless_set(tiny_config):
    assert EvalPlan.from_config(tiny_config("training.seed=77")).seed == 77
    assert EvalPlan.from_config(tiny_config("training.seed=77", "eval.seed=3")).seed == 3


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.batch_size=0", "eval.batch_size=0 must be >= 1"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0 must be >= 1 (or null"),
        ("eval.limit=0", "eval.limit=0 must be >= 1 (or null: every example)"),
        ("eval.shots=[-1]", "eval.shots=[-1] needs at least one shot count, each >= 0"),
        ("eval.shots=4", "eval.shots: expected a list"),
        ("eval.tasks=synthetic_vqa", "eval.tasks: expected a list"),
        ("eval.tasks=[synthetic_vqa, synthetic_vqa]", "eval.tasks lists synthetic_vqa more"),
        ("eval.max_new_token=4", "Unknown config key 'eval.max_new_token'"),
        ("eval.demo_selection=nearest", "eval.demo_selection='nearest' is not one of"),
        ("eval.on_bad=ignore", "eval.on_bad='ignore' is not one of ['stop', 'skip']"),
        ("eval.tasks=[coco_karpaty]", "unknown task 'coco_karpaty' (did you mean 'coco_karpathy'"),
        ("eval.tasks=[]", "eval.tasks is empty"),
    ],
)
def test_a_bad_eval_setting_exits_2_naming_the_field(
    checkpoint, tmp_path, capsys, override, message
):
    tasks = () if override.startswith("eval.tasks=") else ("eval.tasks=[synthetic_vqa]",)
    output = tmp_path / "eval"
    code = cli.main(["--checkpoint", str(checkpoint), "--output", str(output), *tasks, override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_a_bad_value_in_a_config_file_is_reported_like_an_override(checkpoint, tmp_path, capsys):
    bad = _yaml(tmp_path / "bad.yaml", {"eval": {"tasks": ["synthetic_vqa"], "num_beams": 0}})
    code = cli.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path), "--config", bad])
    assert code == 2
    assert "eval.num_beams=0 must be >= 1" in capsys.readouterr().err


def test_too_many_shots_are_refused_before_the_model_loads(checkpoint, tmp_path, capsys):
    command = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "eval")]
    assert cli.main([*command, "eval.tasks=[synthetic_vqa]", "eval.shots=[0, 600]"]) == 2
    assert "eval.shots=[0, 600]: 600 shots need 600 demonstrations" in capsys.readouterr().err


def test_output_dir_still_works_with_a_deprecation_warning(checkpoint, tmp_path, caplog):
    # The one table of old spellings (mm1_megatron/cli/flags.py) handles it, as in every verb.
    with caplog.at_level("WARNING", logger="mm1_megatron.cli"):
        args = cli.parse_args(["--checkpoint", str(checkpoint), "--output-dir", str(tmp_path)])
    assert args.output == tmp_path
    assert "--output-dir is deprecated" in caplog.text and "use --output" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mm1_megatron.cli"):
        assert _args(checkpoint).output is not None
    assert "deprecated" not in caplog.text


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: --output"),
        (["--output", "a", "--tasks", "synthetic_vqa"], "--tasks -> 'eval.tasks=[coco_karpathy"),
        (["--output", "a", "--no-tensorboard"], "--no-tensorboard -> logging.tensorboard=false"),
        (["--output", "a", "--limit=3"], "--limit -> eval.limit=N"),
        (["--output", "a", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_command_line_mistakes_exit_2(checkpoint, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        cli.parse_args(["--checkpoint", str(checkpoint), *argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_model_that_differs_from_the_checkpoint_is_a_warning(checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="mm1_megatron.evaluation.model"):
        cli.configure(
            _args(checkpoint, "eval.tasks=[synthetic_vqa]", "parallel.tensor_parallel_size=2")
        )
        assert not caplog.records  # a layout, not another model
        cli.configure(
            _args(
                checkpoint, "eval.tasks=[synthetic_vqa]", "model.llm.moe.token_dispatcher=allgather"
            )
        )
        assert not caplog.records  # how the layers compute
        cli.configure(_args(checkpoint, "eval.tasks=[synthetic_vqa]", "model.llm.num_layers=3"))
    assert "model.llm.num_layers=3 (checkpoint: 2)" in caplog.text


@pytest.mark.parametrize("how", ["config file", "overrides"])
def test_the_cli_and_periodic_evaluation_build_equal_plans(checkpoint, tmp_path, how):
    from mm1_megatron.training.periodic_eval import PeriodicEvaluation

    training = [*TINY_OVERRIDES, "eval.interval=2", *EVAL]
    train_cfg = validate_config(load_config(DEBUG_CONFIG, training))
    if how == "config file":
        train_yaml = tmp_path / "train.yaml"
        save_config(train_cfg, train_yaml)
        _, cli_plan = cli.configure(_args(checkpoint, "--config", str(train_yaml)))
    else:
        _, cli_plan = cli.configure(_args(checkpoint, *EVAL))
    periodic = PeriodicEvaluation(train_cfg, None, [], None, None, None)
    assert cli_plan == periodic.plan == EvalPlan.from_config(train_cfg)
    assert cli_plan.tasks == ("synthetic_vqa", "synthetic_caption")
    assert (cli_plan.limit, cli_plan.seed, cli_plan.decoding.max_new_tokens) == (4, 5, 2)
    assert cli_plan.protocol.demo_selection == "similar" and cli_plan.decoding.num_beams == 2
    # ... and so the same examples and demonstration pools.
    for ours, theirs in zip(cli_plan.load_tasks(), periodic.tasks):
        assert [e.example_id for e in ours.eval_examples] == [
            e.example_id for e in theirs.eval_examples
        ]
        assert len(ours.eval_examples) == 4
        assert [e.example_id for e in ours.demo_examples] == [
            e.example_id for e in theirs.demo_examples
        ]


def test_the_config_choices_are_the_evaluation_s_own():
    from mm1_megatron.config import schema
    from mm1_megatron.evaluation.metrics.vqa import MODES
    from mm1_megatron.evaluation.protocol import DEMO_SELECTIONS
    from mm1_megatron.evaluation.tasks.problems import ON_BAD_CHOICES

    assert get_args(schema.DemoSelection) == DEMO_SELECTIONS
    assert get_args(schema.OnBadEntry) == ON_BAD_CHOICES
    assert get_args(schema.VQAMode) == MODES
