"""``mm1 estimate`` on the shipped configs: the printed parameter counts are the YAML
headers' (``tests/unit/test_param_count.py`` reads them), the memory breakdown and the
layout table are printed, ``--json`` parses, and the layout model behaves as stated."""

from __future__ import annotations

import json
import re

import pytest

from mm1_megatron.config import load_config
from mm1_megatron.scaling.estimate.cli import main
from mm1_megatron.scaling.estimate.estimator import estimate_config
from mm1_megatron.scaling.estimate.hardware import gpu_type
from mm1_megatron.scaling.estimate.step_time import pipeline_seconds
from mm1_megatron.scaling.estimate.workload import default_workload
from tests.conftest import CONFIG_DIR
from tests.unit.test_param_count import HEADER, SHIPPED, _header

# The YAML header line, as the CLI prints it (without the comment sign).
PRINTED = re.compile(HEADER.pattern.replace(r"^#\s*", "^"), re.MULTILINE)
MM1_30B = str(CONFIG_DIR / "mm1_30b.yaml")


def _run(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_printed_parameter_counts_equal_the_yaml_header(path, capsys):
    out = _run(capsys, "--config", str(path))
    match = PRINTED.search(out)
    assert match, out[:500]
    printed = {k: int(v.replace(",", "")) for k, v in match.groupdict().items()}
    assert printed == _header(path)


@pytest.fixture(scope="module")
def table_30b():
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["--config", MM1_30B, "--gpus", "64", "--top", "5"]) == 0
    return buffer.getvalue()


def test_30b_on_64_gpus_prints_memory_and_a_ranked_table(table_30b):
    out = table_30b
    assert "Memory per GPU (GiB) of the config's layout TP4 PP4 DP4 selective" in out
    stage_rows = re.findall(r"^\s+([0-3])\s+(12|15|14)\s+([1-4])\s", out, re.MULTILINE)
    assert [row[1] for row in stage_rows] == ["12", "15", "15", "14"]
    assert [row[2] for row in stage_rows] == ["4", "3", "2", "1"]  # 1F1B in-flight
    rank_tp_cp_pp_dp = r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+\s+(on|off)\s"
    rows = re.findall(rank_tp_cp_pp_dp, out, re.MULTILINE)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    for _, tp, cp, pp, dp, sp in rows:
        assert int(tp) * int(cp) * int(pp) * int(dp) == 64
        assert int(tp) in (1, 2, 4)  # 52 heads
        assert (sp == "on") == (int(tp) > 1)
    times = [float(t) for t in re.findall(r"^\s+\d+ .* (\d+\.\d+)\s+\S+%\s+\S+%", out, re.M)]
    assert times == sorted(times) and len(times) == 5
    assert "Assumptions:" in out


def test_json_output_parses(capsys):
    report = json.loads(_run(capsys, "--config", MM1_30B, "--gpus", "64", "--top", "3", "--json"))
    assert report["parameters"]["total"] == 32_056_184_384
    assert len(report["layouts"]) == 3
    steps = [lay["step"]["step_seconds"] for lay in report["layouts"]]
    assert steps == sorted(steps)
    stages = report["config_layout"]["memory_stages"]
    assert [s["num_decoder_layers"] for s in stages] == [12, 15, 15, 14]
    assert report["flops_per_step"] == pytest.approx(
        512 * report["flops_per_sequence"]["total"], rel=1e-12
    )
    assert report["assumptions"]


def test_user_mistakes_are_refused(capsys):
    assert main(["--config", MM1_30B, "--gpus", "0"]) == 2
    assert main([]) == 2
    assert main(["--config", MM1_30B, "parallel.tensor_parallel_size=3"]) == 2


def test_a_config_that_does_not_divide_the_gpus_still_gets_a_table(capsys):
    out = _run(capsys, "--config", MM1_30B, "--gpus", "24", "--top", "2")
    assert "does not run on 24 GPUs" in out
    assert re.search(r"^\s+1\s+\d+\s+\d+\s+\d+", out, re.MULTILINE)


def test_memory_grows_with_images_and_recompute_saves_it():
    cfg = load_config(MM1_30B)
    gpu = gpu_type("h100")

    def peak(overrides=(), images=None) -> float:
        c = load_config(MM1_30B, list(overrides))
        w = default_workload(c, images)
        return estimate_config(c, num_gpus=64, gpu=gpu, workload=w).memory.stages[0].total

    assert peak(images=4) < peak(images=16)
    assert peak(["parallel.recompute=full"]) < peak() < peak(["parallel.recompute=none"])
    assert cfg.parallel.recompute == "selective"


def test_pipeline_time_counts_fill_drain_and_the_slowest_stage():
    assert pipeline_seconds([1.0], 8) == 8.0
    assert pipeline_seconds([1.0, 1.0, 1.0, 1.0], 8) == 7 + 4  # (p - 1) / m bubble
    assert pipeline_seconds([2.0, 1.0, 1.0, 1.0], 8) == 7 * 2 + 5  # imbalance stretches all
