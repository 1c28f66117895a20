"""mm1 sweep: a spec expands into one resolved config per run (steps from the token
budget, the MM1 learning-rate rule from its closed form), runs that cannot divide the
cluster or fit its GPUs are pruned with the reason, and a local sweep runs end to end
into a folder mm1 report reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mm1_megatron.config import load_config
from mm1_megatron.models.param_count import count_parameters
from mm1_megatron.scaling.sweep.files import read_sweep, write_sweep
from mm1_megatron.scaling.sweep.spec import load_spec, plan_runs
from tests.conftest import TINY_OVERRIDES
from tests.launch import REPO

DEBUG = str(REPO / "configs" / "debug.yaml")


def _spec(tmp_path: Path, **changes) -> Path:
    spec = {
        "name": "test",
        "configs": [DEBUG],
        "overrides": list(TINY_OVERRIDES),
        "models": [
            {"name": "a", "overrides": {"model.llm.hidden_size": 32}},
            {"name": "b", "overrides": {"model.llm.hidden_size": 64, "model.llm.num_layers": 3}},
        ],
        "tokens": [1000, 5000],
        "cluster": {"gpus": 1},
        **changes,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_runs_get_steps_from_their_token_budget_and_the_mm1_learning_rate(tmp_path):
    runs = plan_runs(load_spec(_spec(tmp_path)), tmp_path / "out")
    assert [r.name for r in runs] == [
        f"{model}-{tokens}tok-lr{r.lr:.3g}"
        for model, tokens, r in zip("aabb", ["1k", "5k"] * 2, runs)
    ]
    for run in runs:
        assert not run.reason, run.reason
        cfg = run.config
        tokens_per_step = cfg.training.global_batch_size * cfg.training.seq_length
        assert cfg.training.train_steps == math.ceil(run.tokens / tokens_per_step)
        n = count_parameters(cfg.model).llm_active_non_embedding
        assert cfg.optimizer.lr == pytest.approx(math.exp(-0.4214 * math.log(n) - 0.5535))
        assert cfg.logging.output_dir == str(tmp_path / "out" / "runs" / run.name)
    assert runs[0].config.model.llm.hidden_size == 32 and runs[2].config.model.llm.num_layers == 3


def test_listed_learning_rates_and_multipliers_multiply(tmp_path):
    spec = load_spec(_spec(tmp_path, learning_rates=[1e-3, 3e-3], lr_multipliers=[0.5, 1.0]))
    runs = plan_runs(spec, tmp_path / "out")
    assert sorted({r.lr for r in runs}) == pytest.approx([5e-4, 1e-3, 1.5e-3, 3e-3])
    assert len(runs) == 2 * 2 * 4 and all(r.config.optimizer.lr == r.lr for r in runs)
    clash = load_spec(_spec(tmp_path, learning_rates=[1e-3, 2e-3], lr_multipliers=[0.5, 1.0]))
    with pytest.raises(ValueError, match="repeat"):  # 2e-3 x 0.5 is 1e-3 x 1.0
        plan_runs(clash, tmp_path / "out")


def test_runs_that_cannot_divide_or_fit_are_pruned_with_the_reason(tmp_path):
    models = [
        {"name": "tp2", "overrides": {"parallel.tensor_parallel_size": 2}},
        {"name": "fits", "overrides": {}},
    ]
    runs = plan_runs(load_spec(_spec(tmp_path, models=models, tokens=[1000])), tmp_path / "o")
    reasons = {r.model: r.reason for r in runs}
    assert reasons["tp2"].startswith("layout:") and "tensor_parallel_size" in reasons["tp2"]
    assert reasons["fits"] == ""
    big = {
        "name": "mm1_7b_on_one_gpu",
        "configs": [str(REPO / "configs" / "mm1_7b.yaml")],
        "overrides": ["parallel.tensor_parallel_size=1", "parallel.sequence_parallel=false"],
        "models": [{"name": "7b"}],
        "tokens": [10**9],
        "cluster": {"gpus": 1, "gpu_type": "h100"},
    }
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(big))
    (run,) = plan_runs(load_spec(tmp_path / "big.yaml"), tmp_path / "o2")
    assert run.reason.startswith("memory: needs") and "GiB per GPU" in run.reason
    write_sweep(load_spec(tmp_path / "big.yaml"), [run], tmp_path / "o2")
    document = read_sweep(tmp_path / "o2")
    assert document["runs"] == [] and document["pruned"][0]["name"] == run.name
    assert not (tmp_path / "o2" / "runs").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": 1}, "unknown keys"),
        ({"models": [{"name": "a"}, {"name": "a"}]}, "distinct"),
        ({"configs": ["nowhere.yaml"]}, "does not exist"),
        ({"learning_rates": "fast"}, "learning_rates"),
        ({"cluster": {"target": "mainframe"}}, "cluster.target"),
    ],
)
def test_bad_specs_are_refused_with_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        load_spec(_spec(tmp_path, **change))


def test_lists_repeat_the_flag_and_the_old_out_still_works(caplog):
    from mm1_megatron.scaling.sweep.cli import parse_args

    assert parse_args(["run", "s", "--only", "a", "--only", "b"]).only == ["a", "b"]
    assert parse_args(["expand", "spec.yaml", "--out", "s"]).output == "s"
    assert "mm1 sweep expand: --out is deprecated" in caplog.text


@pytest.mark.slow
def test_a_local_sweep_runs_and_reports(tmp_path, capsys, monkeypatch):
    """The commands in this process; the run itself is a real training process."""
    from mm1_megatron.scaling.report import cli as report_cli
    from mm1_megatron.scaling.sweep import cli as sweep_cli

    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    spec = _spec(
        tmp_path,
        models=[{"name": "tiny", "overrides": {"model.llm.hidden_size": 32}}],
        tokens=[2 * 8 * 64],  # two steps of the tiny config
        overrides=[*TINY_OVERRIDES, "logging.log_interval=1"],
    )
    out = tmp_path / "sweep"
    assert sweep_cli.main(["expand", str(spec), "--output", str(out)]) == 0
    (entry,) = read_sweep(out)["runs"]
    folder = out / "runs" / entry["name"]
    assert load_config(folder / "config.yaml").training.train_steps == 2
    assert sweep_cli.main(["run", str(out)]) == 0, (folder / "train.log").read_text()[-3000:]
    assert read_sweep(out)["runs"][0]["status"] == "completed"
    steps = [
        json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2]
    capsys.readouterr()
    assert sweep_cli.main(["run", str(out)]) == 0  # nothing left to run
    assert "skipped 1" in capsys.readouterr().out
    assert report_cli.main(["--sweep", str(out), "--output", str(out / "r")]) == 0
    assert entry["name"] in (out / "r" / "report.csv").read_text()


def test_cluster_targets_get_mm1_launch_files_per_run(tmp_path):
    overlay = tmp_path / "cluster.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {
                "cluster": {
                    "job_name": "sweep-test",
                    "nodes": 1,
                    "gpus_per_node": 2,
                    "container": {"image": "registry.example.com/mm1:test"},
                },
                "parallel": {"tensor_parallel_size": 2},
            }
        )
    )
    spec = _spec(tmp_path, configs=[DEBUG, str(overlay)], tokens=[1000],
                 cluster={"gpus": 2, "target": "slurm"})  # fmt: skip
    runs = plan_runs(load_spec(spec), tmp_path / "out")
    write_sweep(load_spec(spec), runs, tmp_path / "out")
    for run in runs:
        script = (tmp_path / "out" / "runs" / run.name / "slurm.sbatch").read_text()
        assert str(tmp_path / "out" / "runs" / run.name / "config.yaml") in script
        assert "--nproc-per-node" in script or "nproc" in script
    wrong = _spec(tmp_path, configs=[DEBUG, str(overlay)], tokens=[1000],
                  cluster={"gpus": 4, "target": "slurm"})  # fmt: skip
    with pytest.raises(ValueError, match="cluster.gpus=4"):
        write_sweep(load_spec(wrong), plan_runs(load_spec(wrong), tmp_path / "w"), tmp_path / "w")
