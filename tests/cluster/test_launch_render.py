"""``mm1 launch render``: every target for a few layouts, with the rendezvous, environment,
shared-memory and RDMA wiring read back from the parsed YAML; layouts that do not fit are
refused with a message naming the fields; the cluster overlay stacks on a model config
for both the launcher and the trainer."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mm1_megatron.config import load_config
from mm1_megatron.launch import plan_launch, render_files
from mm1_megatron.launch.docker import COPIED_PATHS
from mm1_megatron.launch.kubernetes import COMPLETION_INDEX

REPO = Path(__file__).resolve().parents[2]
OVERLAY = "cluster/overlays/example_h100.yaml"

# (model config, overrides, nodes, GPUs per node, expected TP, PP, DP)
LAYOUTS = {
    "mm1_30b_8x8": ("configs/mm1_30b.yaml", [], 8, 8, (4, 4, 4)),
    "mm1_7b_2x8": ("configs/mm1_7b.yaml", ["cluster.nodes=2"], 2, 8, (4, 1, 4)),
    "mm1_3b_moe_1x8_ep8": (
        "configs/mm1_3b_moe.yaml",
        ["cluster.nodes=1", "cluster.kubernetes.rdma_resource=null", "cluster.job_name=moe"],
        1,
        8,
        (1, 1, 8),
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _at_repo_root():
    # Config paths are passed on as given: relative to the repository, as in the image.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        yield


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def rendered(request):
    model, overrides, nodes, gpus, parallel = LAYOUTS[request.param]
    plan = plan_launch([model, OVERLAY], overrides)
    return plan, render_files(plan, ["all"]), (nodes, gpus, parallel)


def _documents(text):
    return [d for d in yaml.safe_load_all(text) if d is not None]


def _env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_layout_matches_the_world_size(rendered):
    plan, files, (nodes, gpus, (tp, pp, dp)) = rendered
    layout = plan.layout
    assert (layout.nodes, layout.gpus_per_node, layout.world_size) == (nodes, gpus, nodes * gpus)
    assert (layout.tensor, layout.pipeline, layout.data) == (tp, pp, dp)
    assert tp * pp * dp == nodes * gpus
    assert set(files) == {"slurm.sbatch", "jobset.yaml", "trainjob.yaml", "Dockerfile"}
    for text in files.values():  # every file says where it came from and its layout
        assert f"= TP {tp} x PP {pp} x DP {dp}" in text


def test_jobset_wires_the_rendezvous_shm_and_rdma(rendered):
    plan, files, (nodes, gpus, _) = rendered
    (jobset,) = _documents(files["jobset.yaml"])
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    name = jobset["metadata"]["name"]
    assert jobset["spec"]["network"]["enableDNSHostnames"] is True
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["name"] == "node" and replicated["replicas"] == 1
    job = replicated["template"]["spec"]
    assert job["parallelism"] == job["completions"] == nodes
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert env["PET_NNODES"] == str(nodes) and env["PET_NPROC_PER_NODE"] == str(gpus)
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    # The headless service JobSet creates: <jobset>-<replicated job>-<job>-<pod>.<jobset>
    assert env["PET_MASTER_ADDR"] == f"{name}-node-0-0.{name}"
    assert env["PET_MASTER_PORT"] == str(plan.cluster.rdzv_port)
    assert env["NCCL_IB_HCA"].startswith("mlx5_0,") and env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    rdma = plan.cluster.kubernetes.rdma_resource
    capabilities = container.get("securityContext", {}).get("capabilities", {}).get("add", [])
    assert ("IPC_LOCK" in capabilities) == (rdma is not None)
    assert (rdma in container["resources"]["limits"]) if rdma else len(capabilities) == 0
    assert pod["terminationGracePeriodSeconds"] == plan.cluster.stop_grace_seconds


def test_trainjob_runs_the_same_command_on_its_own_runtime(rendered):
    plan, files, (nodes, gpus, _) = rendered
    runtime, trainjob = _documents(files["trainjob.yaml"])
    assert (runtime["apiVersion"], runtime["kind"]) == (
        "trainer.kubeflow.org/v1alpha1",
        "TrainingRuntime",
    )
    assert (trainjob["apiVersion"], trainjob["kind"]) == (
        "trainer.kubeflow.org/v1alpha1",
        "TrainJob",
    )
    ref = trainjob["spec"]["runtimeRef"]
    assert ref == {
        "name": runtime["metadata"]["name"],
        "apiGroup": "trainer.kubeflow.org",
        "kind": "TrainingRuntime",
    }
    assert runtime["metadata"]["namespace"] == trainjob["metadata"]["namespace"]
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == gpus
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == gpus
    # The Trainer sets PET_* itself and rejects a TrainJob that sets them.
    assert not [e for e in trainer["env"] if e["name"].startswith("PET_")]
    (jobset,) = _documents(files["jobset.yaml"])
    jobset_container = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert trainer["command"] == jobset_container["spec"]["containers"][0]["command"]
    # The torch plugin finds the trainer pods by this label and the container by name.
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"
    assert node["template"]["metadata"]["labels"] == {
        "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"
    }
    pod = node["template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["name"] == "node"
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_command_passes_configs_and_overrides_through(rendered):
    plan, files, _ = rendered
    (jobset,) = _documents(files["jobset.yaml"])
    command = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"
    ][0]["command"]
    train_args = command[command.index("mm1_megatron.train") + 1 :]
    assert train_args == plan.inputs.training_args()
    assert train_args[:4] == [
        "--config",
        plan.inputs.configs[0],
        "--config",
        plan.inputs.configs[1],
    ]
    assert not [a for a in train_args if a.startswith("cluster.")]  # launcher-only overrides


def test_dockerfile_pins_the_base_and_keeps_the_pip_constraint(rendered):
    plan, files, _ = rendered
    lines = [line for line in files["Dockerfile"].splitlines() if line and not line.startswith("#")]
    assert lines[0] == f"FROM {plan.cluster.container.base_image}"
    assert lines[0].endswith("-py3") and ":latest" not in lines[0]
    text = "\n".join(lines)
    assert f"megatron-core=={plan.cluster.container.megatron_core}" in text
    assert "PIP_CONSTRAINT" not in text  # not unset: it keeps pip off the image's torch
    assert "cmp - /tmp/torch.version" in text  # and the build proves torch was kept
    for line in lines:
        if line.startswith("COPY "):
            for source in shlex.split(line)[1:-1]:
                assert source in COPIED_PATHS and (REPO / source).exists(), line


def _plan_error(model, *overrides):
    with pytest.raises(ValueError) as info:
        plan_launch([model, OVERLAY], list(overrides))
    return str(info.value)


def test_world_size_that_does_not_factor_is_refused():
    message = _plan_error("configs/mm1_30b.yaml", "cluster.nodes=3")
    assert "cluster.nodes x cluster.gpus_per_node = 3 x 8 = 24" in message
    assert "tensor_parallel_size x pipeline_parallel_size = 4 x 4 = 16" in message


def test_expert_parallelism_that_does_not_divide_dp_is_refused():
    message = _plan_error("configs/mm1_3b_moe.yaml", "cluster.nodes=1", "cluster.gpus_per_node=4")
    assert "cluster.nodes x cluster.gpus_per_node = 1 x 4 = 4" in message
    assert "expert_parallel_size x expert_tensor_parallel_size = 8 x 1" in message


def test_a_global_batch_that_does_not_split_is_refused():
    message = _plan_error("configs/mm1_7b.yaml", "cluster.nodes=2", "training.global_batch_size=6")
    assert "training.global_batch_size=6 must be a multiple" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("cluster.nodes=two", "cluster.nodes: expected an integer"),
        ("cluster.job_name=MM1_30B", "cluster.job_name='MM1_30B' must be a DNS label"),
        ("cluster.env.PET_NNODES=4", "cluster.env.PET_NNODES is set by the launcher"),
        ("cluster.container.base_image=nvcr.io/nvidia/pytorch", "must name a pinned tag"),
        ("cluster.gpus_pernode=8", "Unknown config key 'cluster.gpus_pernode'"),
        ("parallel.tensor_parallel_size=5", "not divisible by parallel.tensor_parallel_size=5"),
        ("cluster.slurm.partition=gpu a", "cluster.slurm.partition='gpu a' must be a single word"),
        (
            "cluster.container.mounts=[{host_path: /a:b, container_path: /x}]",
            "cluster.container.mounts[0].host_path='/a:b': no , or :",
        ),
    ],
)
def test_bad_settings_are_refused_naming_the_field(override, expected):
    assert expected in _plan_error("configs/mm1_30b.yaml", override)


def test_the_overlay_stacks_on_the_model_config_for_the_trainer_too():
    model = REPO / "configs" / "mm1_30b.yaml"
    stacked = load_config([model, REPO / OVERLAY])  # the trainer skips `cluster:`
    alone = load_config(model)
    assert stacked.model == alone.model and stacked.parallel == alone.parallel
    assert stacked.checkpoint.save_dir == "/runs/mm1_30b/checkpoints"
    assert not hasattr(stacked, "cluster")


@pytest.mark.slow
def test_the_launcher_imports_neither_torch_nor_megatron():
    code = (
        "import sys, mm1_megatron.launch.cli; "
        "assert not {'torch', 'megatron'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
