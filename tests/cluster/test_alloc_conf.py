"""Every launcher gives the workers ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``
(the ViT batch changes size every micro-batch, which fragments the caching allocator),
unless the user set it: in the submitting shell for the scripts, in ``cluster.env`` for
the rendered manifests. The scripts run with stand-in ``srun``, ``scontrol`` and
``torchrun`` that record the environment the workers would get."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from mm1_megatron.launch import plan_launch
from mm1_megatron.launch.kubernetes import render_jobset, render_trainjob
from mm1_megatron.launch.slurm import render_slurm

# Starts processes (scripts, launchers, tools): the slow tier.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEFAULT = "expandable_segments:True"
USERS = "expandable_segments:False,max_split_size_mb:512"
MODEL_AND_OVERLAY = ["configs/mm1_30b.yaml", "cluster/overlays/example_h100.yaml"]

# Each stand-in writes the value the workers would inherit, then exits 0.
RECORD = '#!/usr/bin/env bash\nprintf "%s" "${PYTORCH_CUDA_ALLOC_CONF-unset}" > "$FAKE_OUT"\n'
SCONTROL = '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo node-a\nexit 0\n'


def _stand_ins(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("srun", RECORD), ("torchrun", RECORD), ("scontrol", SCONTROL)):
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def _workers_value(script: Path, tmp_path: Path, user_value) -> str:
    env = dict(
        os.environ,
        PATH=f"{_stand_ins(tmp_path / 'bin')}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node-a",
        SLURM_NNODES="1",
        SLURM_CPUS_ON_NODE="8",
        SLURM_SUBMIT_DIR=str(tmp_path),
        FAKE_OUT=str(tmp_path / "value.txt"),
    )
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env.pop("MM1_PREEMPTION_MARKER", None)
    if user_value is not None:
        env["PYTORCH_CUDA_ALLOC_CONF"] = user_value
    result = subprocess.run(
        ["bash", str(script), "--config", "configs/debug.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return (tmp_path / "value.txt").read_text()


@pytest.fixture(scope="module")
def rendered_slurm(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        plan = plan_launch(MODEL_AND_OVERLAY, [])
    path = tmp_path_factory.mktemp("rendered") / "slurm.sbatch"
    path.write_text(render_slurm(plan))
    return path


@pytest.mark.parametrize("user_value, expected", [(None, DEFAULT), (USERS, USERS)])
@pytest.mark.parametrize("script", ["slurm_mm1.sbatch", "torchrun_multinode.sh", "rendered"])
def test_scripts_export_expandable_segments_unless_already_set(
    script, user_value, expected, tmp_path, rendered_slurm
):
    path = rendered_slurm if script == "rendered" else REPO / "cluster" / script
    assert _workers_value(path, tmp_path, user_value) == expected


def _plan(*overrides):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        return plan_launch(MODEL_AND_OVERLAY, list(overrides))


def _container_env(manifest: str) -> dict:
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("env"), list):
                found.update({e["name"]: e.get("value") for e in node["env"]})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for document in yaml.safe_load_all(manifest):
        walk(document)
    return found


@pytest.mark.parametrize("render", [render_jobset, render_trainjob], ids=["jobset", "trainjob"])
def test_manifests_set_expandable_segments_and_cluster_env_wins(render):
    assert _container_env(render(_plan()))["PYTORCH_CUDA_ALLOC_CONF"] == DEFAULT
    mine = _container_env(render(_plan(f"cluster.env.PYTORCH_CUDA_ALLOC_CONF={USERS}")))
    assert mine["PYTORCH_CUDA_ALLOC_CONF"] == USERS


def test_rendered_slurm_lets_cluster_env_win(tmp_path):
    script = tmp_path / "slurm.sbatch"
    script.write_text(render_slurm(_plan(f"cluster.env.PYTORCH_CUDA_ALLOC_CONF={USERS}")))
    assert _workers_value(script, tmp_path, None) == USERS
