"""Config mistakes and hostile config files: every problem at once, exit 2, bounded.

Unknown keys and wrong types are listed together (with the value checks that do not
involve them); YAML errors, tags such as ``!!python/object/apply`` and alias bombs are
``ValueError``s naming the file or override and the place, so every CLI exits 2 with one
short message and no code from the file ever runs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from mm1_megatron.config import load_config
from mm1_megatron.config.messages import MAX_LISTED

REPO = Path(__file__).resolve().parents[2]
DEBUG = str(REPO / "configs" / "debug.yaml")


def _error(*args, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def _problems(message: str) -> list:
    head, *lines = message.split("\n  - ")
    assert head == "Invalid configuration:", message
    return lines


# ---- every unknown key and wrong type at once ------------------------------------------


def test_two_unknown_keys_and_three_type_errors_are_reported_together():
    message = _error(
        DEBUG,
        [
            "training.train_steps=abc",
            "optimizer.lr=fast",
            "training.bogus=1",
            "model.llm.num_layerz=3",
            "model.llm.hidden_size=12.5",
        ],
    )
    lines = _problems(message)
    assert len(lines) == 5, message
    assert "training.train_steps: expected an integer, got 'abc'" in lines
    assert "optimizer.lr: expected a number, got 'fast'" in lines
    assert "model.llm.hidden_size: expected an integer, got 12.5" in lines
    unknown = [line for line in lines if line.startswith("Unknown config key")]
    assert any("'model.llm.num_layerz'. Did you mean 'num_layers'?" in u for u in unknown)
    assert any("'training.bogus'" in u for u in unknown)


def test_problems_of_files_and_overrides_are_listed_together(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("training:\n  seed: lots\nmodel:\n  vision:\n    patch_sise: 16\n")
    lines = _problems(_error([DEBUG, overlay], ["eval.limit=[1]", "checkpoint.keep_lats=2"]))
    assert len(lines) == 4
    for field in ("training.seed", "model.vision.patch_sise", "eval.limit", "keep_lats"):
        assert any(field in line for line in lines), (field, lines)


def test_value_checks_come_in_the_same_pass_unless_they_touch_a_refused_field():
    lines = _problems(
        _error(
            DEBUG,
            [
                "training.train_steps=abc",  # refused: train_steps keeps its default
                "parallel.tensor_parallel_size=3",  # value check: heads not divisible by 3
                "training.seq_length=long",  # refused: seq_length keeps its default ...
                "model.llm.max_sequence_length=16",  # ... which this would be judged against
            ],
        )
    )
    assert any("not divisible by parallel.tensor_parallel_size=3" in line for line in lines)
    assert not any("exceeds model.llm.max_sequence_length" in line for line in lines), lines
    assert sum("expected an integer" in line for line in lines) == 2


def test_a_single_problem_is_one_line():
    assert _error(DEBUG, ["training.train_steps=abc"]) == (
        "training.train_steps: expected an integer, got 'abc'"
    )


def test_the_list_is_bounded(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("training:\n" + "".join(f"  key_{i}: 1\n" for i in range(500)))
    lines = _problems(_error(path))
    assert len(lines) == MAX_LISTED + 1
    assert lines[-1] == f"... and {500 - MAX_LISTED} more"


# ---- YAML that must not run or hang ----------------------------------------------------

EVIL = '!!python/object/apply:os.system ["touch {marker}"]'


@pytest.fixture
def logged(monkeypatch, caplog):
    """The CLIs reconfigure the root logger; keep pytest's capture instead."""
    for module in (
        "mm1_megatron.train",
        "mm1_megatron.launch.cli",
        "mm1_megatron.scaling.sweep.cli",
    ):
        monkeypatch.setattr(f"{module}.setup_logging", lambda: None)
    caplog.set_level(logging.INFO)
    return caplog


def _run_cli(name: str, config: Path, overrides=()) -> int:
    if name == "mm1-train":
        from mm1_megatron.train import main

        return main(["--config", str(config), *overrides])
    if name == "mm1-estimate":
        from mm1_megatron.scaling.estimate.cli import main

        return main(["--config", str(config), *overrides])
    from mm1_megatron.launch.cli import main

    return main(["render", "--config", str(config), "--dry-run", *overrides])


@pytest.mark.parametrize("cli", ["mm1-train", "mm1-estimate", "mm1-launch"])
def test_a_python_tag_in_a_file_exits_2_and_runs_nothing(cli, tmp_path, logged):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f"model: {EVIL.format(marker=marker)}\n")
    assert _run_cli(cli, evil) == 2
    assert not marker.exists()
    assert f"{evil}, line 1, column 8: invalid YAML: could not determine a constructor" in (
        logged.text
    )


def test_a_python_tag_in_an_override_exits_2_and_runs_nothing(tmp_path, logged):
    marker = tmp_path / "pwned"
    override = f"model={EVIL.format(marker=marker)}"
    assert _run_cli("mm1-train", Path(DEBUG), [override]) == 2
    assert not marker.exists()
    assert "override 'model=!!python/object/apply:os.system" in logged.text
    assert "line 1, column 7" in logged.text  # the tag's place in the override


def test_a_yaml_syntax_error_exits_2_naming_the_file_and_line(tmp_path, logged):
    bad = tmp_path / "bad.yaml"
    bad.write_text("logging:\n  log_interval: 5\ntraining: [unclosed\n")
    assert _run_cli("mm1-train", bad) == 2
    assert f"{bad}, line 4, column 1: invalid YAML: while parsing a flow sequence" in logged.text
    assert "(from line 3, column 11)" in logged.text


def test_a_sweep_spec_with_a_python_tag_exits_2(tmp_path, logged):
    from mm1_megatron.scaling.sweep.cli import main

    marker = tmp_path / "pwned"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: {EVIL.format(marker=marker)}\n")
    assert main(["expand", str(spec), "--dry-run"]) == 2
    assert not marker.exists()
    assert f"sweep spec {spec}, line 1, column 7: invalid YAML" in logged.text


def _billion_laughs(levels: int) -> str:
    """``levels`` nested lists of 9 aliases each: 9**levels values in a few hundred bytes."""
    lines = ["training:", "  train_steps:", "    - &a0 [" + ", ".join(['"lol"'] * 9) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"    - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int) -> str:
    """The same with ``<<:`` merge keys, which PyYAML flattens into copies."""
    lines = ["training: &m0 {seed: 1}"]
    for i in range(1, levels + 1):
        lines.append(f"x{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text", [_billion_laughs(8), _billion_laughs(10), _merge_bomb(9)], ids=["8", "10", "merge"]
)
def test_alias_bombs_are_refused_fast_with_a_short_message(text, tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    message = _error(path)
    assert time.perf_counter() - start < 1.0
    assert len(message) < 2000
    assert message.startswith(f"{path}: its aliases (*name) expand to")


def test_aliases_within_the_limit_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "model:\n  vision:\n    image_mean: &mean [0.5, 0.5, 0.5]\n    image_std: *mean\n"
    )
    assert load_config(path).model.vision.image_std == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("training: &x [*x]\n", "line 1, column 11: an alias refers to a collection"),
        ("training:\n  seed: 1\ntraining:\n  seed: 2\n", "line 3, column 1: key 'training'"),
        ("training: " + "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
        ("training:\n  seed: 1" + "0" * 5000 + "\n", "unreadable value: Exceeds the limit"),
        ("training:\n  seed: 0x" + "f" * 5000 + "\n", "training.seed: <an integer of 20000 bits>"),
        ("include: 5\n", "include must be a file name or a list of them, got 5"),
        ("- training\n", "the top level must be a mapping"),
    ],
    ids=["recursive", "duplicate", "deep", "digits", "hex", "include", "list"],
)
def test_hostile_documents_are_value_errors(text, expected, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    message = _error(path)
    assert expected in message
    assert len(message) < 2000


def test_a_binary_file_is_a_value_error(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02\x8a\x0a" + bytes(range(256)))
    assert "not UTF-8 text" in _error(path)


def test_long_values_are_cut_in_messages(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(
        f"training:\n  train_steps: {'x' * 100_000}\n  seed: [{', '.join(['1'] * 10_000)}]\n"
    )
    lines = _problems(_error(path))
    assert all(len(line) < 200 for line in lines), lines
    assert lines[0].startswith("training.train_steps: expected an integer, got 'xxx")
    assert "..." in lines[0] and "..." in lines[1]
