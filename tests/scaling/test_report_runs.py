"""Reading run folders (``mm1_megatron.scaling.report.runs``): the stored real runs against what
the trainer itself logged, and damaged or partial folders reported with a status."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from mm1_megatron.scaling.report.runs import collect_runs, load_run
from mm1_megatron.scaling.report.sweep_runs import collect_sweep
from tests.scaling.report_fixtures import (
    GLOBAL_BATCH,
    RUN_NAMES,
    SEQ_LENGTH,
    STORED,
    copy_run,
    read_jsonl,
    sweep_entries,
    write_jsonl,
    write_tensorboard,
)


@pytest.mark.parametrize("entry", sweep_entries(), ids=lambda e: e["name"])
def test_stored_run_matches_what_the_trainer_logged(entry):
    folder = STORED / entry["name"]
    logged = read_jsonl(folder / "metrics.jsonl")
    record = load_run(folder)
    assert record.status == "complete" and record.notes == []
    assert record.steps == list(range(1, 21)) and record.target_steps == 20
    # The trainer's own start-up line (stored in sweep.json by make_report_fixtures.py).
    assert record.params_total == entry["params"]
    # Closed form: every step processes the global batch of full-length sequences.
    assert record.tokens == [s * GLOBAL_BATCH * SEQ_LENGTH for s in record.steps]
    assert record.total_tokens == entry["tokens"]
    assert record.loss_tokens == sum(r["num_text_tokens"] for r in logged)
    # 10% of 20 logged steps: the mean of the last two losses.
    assert record.train_loss_window == 2
    assert record.train_loss == pytest.approx(statistics.fmean(r["loss"] for r in logged[-2:]))
    assert record.heldout_loss == logged[-1]["heldout/loss"]
    assert record.eval_scores == {"synthetic_vqa/0shot": logged[-1]["eval/synthetic_vqa/0shot"]}
    assert record.eval_source == "metrics step 20" and record.eval_step == 20
    assert record.mfu is None  # CPU: no peak FLOP/s
    second_half = [r["tflops_per_s_per_device"] for r in logged[10:]]
    assert record.tflops_per_device == pytest.approx(statistics.median(second_half))
    assert record.train_seconds == pytest.approx(sum(r["step_time_s"] for r in logged))


@pytest.mark.parametrize("name", RUN_NAMES)
def test_flops_equal_what_the_trainer_measured(name):
    """The FLOPs rebuilt from the saved config and each step's counts equal the trainer's
    own count, recovered from its logged throughput (one process: FLOPs = TFLOP/s x s)."""
    folder = STORED / name
    logged = read_jsonl(folder / "metrics.jsonl")
    measured, total = [], 0.0
    for r in logged:
        total += r["tflops_per_s_per_device"] * 1e12 * r["step_time_s"]
        measured.append(total)
    assert load_run(folder).flops == pytest.approx(measured, rel=1e-9)


def test_truncated_last_line_is_an_incomplete_run(tmp_path):
    folder = copy_run("llm_h64_l2", tmp_path / "run")
    text = (folder / "metrics.jsonl").read_text()
    (folder / "metrics.jsonl").write_text(text[: len(text) - 120])  # killed mid-write
    record = load_run(folder)
    assert record.status == "incomplete"
    assert record.num_bad_lines == 1 and record.last_step == 19
    assert "19 of 20 steps logged" in record.notes
    assert record.heldout_loss is None  # the last evaluation was at step 20
    assert record.eval_step == 10  # the scores of the evaluation at step 10 remain
    assert record.flops_at(10) == record.flops[9] and record.flops_at(0) is None


def test_damaged_line_inside_the_file_is_skipped(tmp_path):
    """Killed mid-write, then resumed: the next record lands on the partial line."""
    folder = copy_run("llm_h64_l2", tmp_path / "run")
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[9] = lines[9][:50] + lines[10]
    del lines[10]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    record = load_run(folder)
    assert record.status == "complete" and record.num_bad_lines == 1
    assert 10 not in record.steps and 11 not in record.steps
    # The step after the gap stands for the skipped steps: FLOPs stay close to the full
    # count (steps differ only by their data-dependent attention and image counts).
    assert record.total_flops == pytest.approx(
        load_run(STORED / "llm_h64_l2").total_flops, rel=0.05
    )


def test_resumed_run_keeps_the_later_record_of_a_step(tmp_path):
    folder = copy_run("llm_h32_l2", tmp_path / "run")
    logged = read_jsonl(folder / "metrics.jsonl")
    redone = [dict(r, loss=r["loss"] + 1.0) for r in logged[12:]]
    write_jsonl(folder / "metrics.jsonl", logged + redone)
    record = load_run(folder)
    assert record.steps == list(range(1, 21))
    assert record.losses[12:] == [r["loss"] for r in redone]
    assert record.total_flops == pytest.approx(load_run(STORED / "llm_h32_l2").total_flops)


def test_run_without_metrics_has_a_status(tmp_path):
    folder = copy_run("llm_h32_l2", tmp_path / "run")
    (folder / "metrics.jsonl").unlink()
    record = load_run(folder)
    assert record.status == "no_metrics" and record.steps == []
    assert record.params_total == sweep_entries()[0]["params"]
    assert record.total_flops is None and record.final_loss("train") is None


def test_run_without_config_is_unreadable(tmp_path):
    folder = copy_run("llm_h32_l2", tmp_path / "broken")
    (folder / "config.yaml").unlink()
    with pytest.raises(ValueError, match="run folder .*broken: no config.yaml"):
        load_run(folder)
    (folder / "config.yaml").write_text("model: [not, a, mapping]\n")
    with pytest.raises(ValueError, match="broken: config.yaml is not a readable config"):
        load_run(folder)
    with pytest.raises(ValueError, match="does not exist"):
        load_run(tmp_path / "nowhere")
    (record,) = collect_runs([folder])
    assert record.status == "unreadable" and "config.yaml" in record.notes[0]


def test_tensorboard_is_read_when_metrics_jsonl_is_missing(tmp_path):
    folder = copy_run("llm_h96_l3", tmp_path / "run")
    logged = read_jsonl(folder / "metrics.jsonl")
    write_tensorboard(folder / "tensorboard", logged)
    (folder / "metrics.jsonl").unlink()
    from_events, from_jsonl = load_run(folder), load_run(STORED / "llm_h96_l3")
    assert from_events.notes == ["read from TensorBoard (no metrics.jsonl)"]
    assert from_events.steps == from_jsonl.steps
    # TensorBoard stores float32; the counts behind the FLOPs are exact integers.
    assert from_events.losses == pytest.approx(from_jsonl.losses, rel=1e-6)
    assert from_events.flops == pytest.approx(from_jsonl.flops, rel=1e-6)
    assert from_events.heldout_loss == pytest.approx(from_jsonl.heldout_loss, rel=1e-6)


def test_mm1_eval_results_are_preferred_to_the_periodic_scores(tmp_path):
    folder = copy_run("llm_h128_l4", tmp_path / "run")

    def results(step, score):  # the layout of evaluation/report.py's results.json
        shots = {"0": {"score": score, "num_examples": 200, "seconds": 1.0}}
        return {
            "checkpoint": "ckpt",
            "step": step,
            "tasks": {"synthetic_caption": {"metric": "cider", "shots": shots}},
        }

    (folder / "eval_early").mkdir()
    (folder / "eval_early/results.json").write_text(json.dumps(results(10, 0.1)))
    (folder / "eval").mkdir()
    (folder / "eval/results.json").write_text(json.dumps(results(20, 1.25)))
    (folder / "other").mkdir()
    (folder / "other/results.json").write_text("{not json")
    record = load_run(folder)
    assert record.eval_scores == {"synthetic_caption/0shot": 1.25}
    assert record.eval_source == "eval/results.json" and record.eval_step == 20


def test_sweep_lists_runs_with_their_metadata(tmp_path):
    sweep = tmp_path / "sweep"
    for name in RUN_NAMES[:2]:
        copy_run(name, sweep / "runs" / name)
    copy_run("llm_h96_l3", sweep / "runs/unlisted")
    entries = sweep_entries()[:2] + [{"name": "queued", "status": "pending", "lr": 0.01}]
    (sweep / "sweep.json").write_text(json.dumps({"runs": entries}))
    records = {r.name: r for r in collect_sweep(sweep)}
    assert list(records) == ["llm_h32_l2", "llm_h64_l2", "queued", "unlisted"]
    assert records["llm_h32_l2"].label == "0.28M"
    assert records["llm_h32_l2"].sweep_meta["params"] == records["llm_h32_l2"].params_total
    assert records["queued"].status == "missing" and records["queued"].sweep_status == "pending"
    assert records["unlisted"].status == "complete"
    assert records["unlisted"].notes == ["not listed in sweep.json"]
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"label": "no name"}]}))
    with pytest.raises(ValueError, match="run #0 has no 'name'"):
        collect_sweep(sweep)
    with pytest.raises(ValueError, match="no sweep.json"):
        collect_sweep(tmp_path)


def test_final_loss_window_is_capped_by_last_k():
    record = load_run(STORED / "llm_h32_l2", last_k=1)
    assert record.train_loss_window == 1
    assert record.train_loss == record.losses[-1]
    assert not math.isnan(record.train_loss)
    with pytest.raises(ValueError, match="last_k=0"):
        load_run(STORED / "llm_h32_l2", last_k=0)
