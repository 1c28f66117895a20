"""``mm1 report`` end to end on stored run folders: the real fixture sweep, synthetic runs
that follow a power law exactly, and a sweep with broken runs; ``--json`` prints the
report.json it always writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from mm1_megatron.scaling.report.cli import PLOT_FILES, main
from tests.scaling.report_fixtures import (
    RUN_NAMES,
    STORED,
    copy_run,
    make_sweep,
    sweep_entries,
    synthetic_config,
    write_synthetic_run,
)


def read_csv(path):
    with path.open() as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def assert_valid_png(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= 600 and image.height >= 250
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # something is drawn on the white canvas


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    sweep = make_sweep(tmp_path_factory.mktemp("sweep"))
    assert main(["--sweep", str(sweep), "--output", str(out)]) == 0
    return out


def test_table_holds_every_run(sweep_report):
    rows = read_csv(sweep_report / "report.csv")
    assert list(rows) == RUN_NAMES
    document = json.loads((sweep_report / "report.json").read_text())
    assert document["loss_kind"] == "heldout"  # every run measured it at its last step
    for entry in sweep_entries():
        row = rows[entry["name"]]
        assert row["status"] == "complete" and row["label"] == entry["label"]
        assert int(row["params_total"]) == entry["params"]
        assert float(row["tokens"]) == entry["tokens"]
        assert float(row["final_loss"]) == float(row["heldout_loss"])
        assert row["sweep:lr"] == str(entry["lr"])
        assert row["eval:synthetic_vqa/0shot"] != ""
    markdown = (sweep_report / "report.md").read_text()
    for name in RUN_NAMES:
        assert f"| {name} | " in markdown
    assert "## Fit: final loss vs training compute" in markdown
    assert "## Fit: final loss vs parameters" in markdown
    assert "exponent b = **" in markdown and "95% CI" in markdown


def test_fit_in_the_report_is_the_fit_of_the_table(sweep_report):
    """The exponent equals a log-log least-squares line through the table's own numbers,
    and each point's residual is its distance from that line."""
    rows = read_csv(sweep_report / "report.csv")
    fits = json.loads((sweep_report / "report.json").read_text())["fits"]
    for axis, column, residual in (
        ("compute", "flops", "compute_fit_residual_percent"),
        ("parameters", "params_total", "params_fit_residual_percent"),
    ):
        x = np.array([float(rows[n][column]) for n in RUN_NAMES])
        loss = np.array([float(rows[n]["final_loss"]) for n in RUN_NAMES])
        slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
        assert fits[axis]["b"] == pytest.approx(-slope, rel=1e-9)
        low, high = fits[axis]["b_interval"]
        assert low <= fits[axis]["b"] <= high
        expected = 100 * (loss / (np.exp(intercept) * x**slope) - 1)
        assert [float(rows[n][residual]) for n in RUN_NAMES] == pytest.approx(expected, abs=1e-6)


def test_plots_are_valid_images(sweep_report):
    for name in PLOT_FILES.values():
        assert_valid_png(sweep_report / name)
    markdown = (sweep_report / "report.md").read_text()
    assert "![final_loss_vs_compute](final_loss_vs_compute.png)" in markdown


def test_plain_run_folders_give_the_same_fit(sweep_report, tmp_path, capsys):
    runs = [str(STORED / name) for name in RUN_NAMES]
    assert main([*runs, "--output", str(tmp_path), "--json", "--no-plots"]) == 0
    printed = capsys.readouterr().out  # --json: one JSON object on stdout, nothing else
    plain = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(printed) == plain
    swept = json.loads((sweep_report / "report.json").read_text())
    assert plain["fits"]["compute"]["b"] == swept["fits"]["compute"]["b"]
    assert [r["name"] for r in plain["runs"]] == RUN_NAMES
    assert not list(tmp_path.glob("*.png"))


def synthetic_sweep(root, a_compute, b_compute, a_params, b_params):
    """Five runs of different sizes and budgets: training loss a C^-b in the FLOPs spent,
    held-out loss a N^-b in the parameter count."""
    from mm1_megatron.models.param_count import count_parameters

    sizes = [(32, 2, 40), (48, 2, 30), (64, 3, 25), (96, 3, 20), (128, 4, 15)]
    entries = []
    for hidden, layers, steps in sizes:
        name = f"h{hidden}_l{layers}_s{steps}"
        params = count_parameters(synthetic_config(hidden, layers, steps).model).total
        write_synthetic_run(
            root / "runs" / name,
            hidden=hidden,
            layers=layers,
            steps=steps,
            loss_of_flops=lambda c: a_compute * c ** (-b_compute),
            heldout_loss=a_params * params ** (-b_params),
        )
        entries.append({"name": name, "label": f"h{hidden}"})
    (root / "sweep.json").write_text(json.dumps({"runs": entries}))
    return root


def test_synthetic_power_law_is_recovered(tmp_path):
    sweep = synthetic_sweep(tmp_path / "sweep", 120.0, 0.15, 40.0, 0.2)
    out = tmp_path / "out"
    out.mkdir()
    (out / PLOT_FILES["eval_vs_compute"]).write_bytes(b"an earlier report's plot")
    common = ["--sweep", str(sweep), "--output", str(out), "--bootstrap", "400"]
    assert main([*common, "--loss", "train", "--last-k", "1"]) == 0
    compute = json.loads((out / "report.json").read_text())["fits"]["compute"]
    assert compute["b"] == pytest.approx(0.15, rel=1e-9)
    assert compute["a"] == pytest.approx(120.0, rel=1e-7)
    low, high = compute["b_interval"]
    assert low == pytest.approx(0.15, rel=1e-9) and high == pytest.approx(0.15, rel=1e-9)
    assert compute["max_abs_residual_percent"] < 1e-8
    for key, name in PLOT_FILES.items():  # MFU is known here: the other branch of its plot
        if key != "eval_vs_compute":  # no evaluation scores
            assert_valid_png(out / name)
    assert not (out / PLOT_FILES["eval_vs_compute"]).exists()  # not drawn, stale one gone

    assert main([*common, "--loss", "heldout", "--no-plots"]) == 0
    params = json.loads((out / "report.json").read_text())["fits"]["parameters"]
    assert params["b"] == pytest.approx(0.2, rel=1e-9)
    assert params["a"] == pytest.approx(40.0, rel=1e-7)
    assert params["max_abs_residual_percent"] < 1e-8


def test_broken_runs_are_reported_not_fatal(tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    truncated = copy_run("llm_h32_l2", sweep / "runs/truncated")
    text = (truncated / "metrics.jsonl").read_text()
    (truncated / "metrics.jsonl").write_text(text[: len(text) // 2 + 7])
    (copy_run("llm_h32_l2", sweep / "runs/no_metrics") / "metrics.jsonl").unlink()
    (copy_run("llm_h32_l2", sweep / "runs/no_config") / "config.yaml").unlink()
    entries = sweep_entries() + [
        {"name": "truncated", "status": "failed"},
        {"name": "no_metrics", "status": "running"},
        {"name": "never_started", "status": "pending"},
    ]
    (sweep / "sweep.json").write_text(json.dumps({"runs": entries}))
    out = tmp_path / "out"
    assert main(["--sweep", str(sweep), "--output", str(out)]) == 0
    rows = read_csv(out / "report.csv")
    expected = {"truncated": "incomplete", "no_metrics": "no_metrics", "never_started": "missing"}
    expected.update({"no_config": "unreadable"}, **{name: "complete" for name in RUN_NAMES})
    assert {name: row["status"] for name, row in rows.items()} == expected
    assert rows["truncated"]["sweep_status"] == "failed"
    assert "unreadable metrics line" in rows["truncated"]["notes"]
    document = json.loads((out / "report.json").read_text())
    assert {e["name"] for e in document["excluded"]} == {
        "truncated",
        "no_metrics",
        "no_config",
        "never_started",
    }
    assert document["fits"]["compute"]["num_points"] == 4
    markdown = (out / "report.md").read_text()
    assert "- truncated: status incomplete" in markdown
    assert "- no_config: run folder" in markdown
    for name in PLOT_FILES.values():
        assert_valid_png(out / name)


def test_report_without_a_fit(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(STORED / "llm_h32_l2"), "--output", str(out), "--no-plots"]) == 0
    assert capsys.readouterr().out == ""  # without --json nothing on stdout
    assert json.loads((out / "report.json").read_text())["fits"]["compute"] is None
    markdown = (out / "report.md").read_text()
    assert "not fitted: needs 2 runs of different size, has 1" in markdown
    assert "## Plots" not in markdown


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nowhere"], "run folder nowhere does not exist"),
        ([], "give either run folders or --sweep"),
        (["--sweep", "nowhere"], "sweep folder nowhere does not exist"),
        ([str(STORED / "llm_h32_l2"), "--last-k", "0"], "--last-k=0"),
        ([str(STORED / "llm_h32_l2"), "--irreducible-loss", "9"], "not below the final"),
    ],
)
def test_user_mistakes_exit_2(tmp_path, capsys, argv, message):
    assert main([*argv, "--output", str(tmp_path / "out"), "--no-plots"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_old_out_spelling_warns_and_still_works(tmp_path, caplog):
    out = tmp_path / "out"
    assert main([str(STORED / "llm_h32_l2"), "--out", str(out), "--no-plots"]) == 0
    assert (out / "report.csv").is_file()
    assert "mm1 report: --out is deprecated and goes in the next release; use --output" in [
        r.getMessage() for r in caplog.records
    ]


def test_the_output_folder_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(STORED / "llm_h32_l2")])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --output" in capsys.readouterr().err
