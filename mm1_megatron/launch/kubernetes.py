"""Kubernetes manifests: a JobSet, and a Kubeflow Trainer TrainJob with its runtime.

Both run the same torchrun command and take the rendezvous from torchrun's ``PET_*``
environment variables (``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR``, ``PET_MASTER_PORT``): the Kubeflow Trainer's torch plugin sets them for
a TrainJob; the JobSet sets them itself, the node rank from the Indexed Job's completion
index and the address from the headless service JobSet creates
(``<name>-node-0-0.<name>``). Shared memory is an in-memory ``/dev/shm`` volume; RDMA is
the device plugin's resource plus the ``IPC_LOCK`` capability (pinned memory).
"""

from __future__ import annotations

from typing import Any, Dict, List

import yaml

from mm1_megatron.launch.plan import LaunchPlan
from mm1_megatron.launch.settings import CUDA_ALLOC_CONF

JOBSET_FILE = "jobset.yaml"
TRAINJOB_FILE = "trainjob.yaml"
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
REPLICATED_JOB = "node"  # the Trainer's torch plugin names the rendezvous after it
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"


def _env(plan: LaunchPlan) -> List[Dict[str, Any]]:
    values = {
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "PYTORCH_CUDA_ALLOC_CONF": CUDA_ALLOC_CONF,
        **plan.cluster.env,  # the user's values win
    }
    return [{"name": name, "value": value} for name, value in values.items()]


def _rendezvous_env(plan: LaunchPlan) -> List[Dict[str, Any]]:
    name, layout = plan.cluster.job_name, plan.layout
    return [
        {"name": "PET_NNODES", "value": str(layout.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(layout.gpus_per_node)},
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
        {"name": "PET_MASTER_ADDR", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}"},
        {"name": "PET_MASTER_PORT", "value": str(plan.cluster.rdzv_port)},
    ]


def _resources(plan: LaunchPlan) -> Dict[str, Any]:
    k8s = plan.cluster.kubernetes
    limits: Dict[str, Any] = {"nvidia.com/gpu": plan.layout.gpus_per_node}
    if k8s.rdma_resource:
        limits[k8s.rdma_resource] = k8s.rdma_per_node
    return {"limits": limits}


def _volumes(plan: LaunchPlan):
    volumes = [
        {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": plan.cluster.kubernetes.shm_size},
        }
    ]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    for i, mount in enumerate(plan.cluster.container.mounts):
        name = f"mount-{i}"
        if mount.claim:
            source = {"persistentVolumeClaim": {"claimName": mount.claim}}
        else:
            source = {"hostPath": {"path": mount.host_path, "type": "Directory"}}
        volumes.append({"name": name, **source})
        mounts.append(
            {"name": name, "mountPath": mount.container_path, "readOnly": mount.read_only}
        )
    return volumes, mounts


def _command(plan: LaunchPlan) -> List[str]:
    # Restarts are the JobSet's (all pods anew), not torchrun's.
    return ["torchrun", "--max-restarts=0", *plan.torchrun_args()]


def _pod_template(plan: LaunchPlan, container: Dict[str, Any]) -> Dict[str, Any]:
    cluster, k8s = plan.cluster, plan.cluster.kubernetes
    volumes, volume_mounts = _volumes(plan)
    container = {
        "name": container["name"],
        "image": cluster.container.image,
        "workingDir": cluster.container.workdir,
        **{key: value for key, value in container.items() if key != "name"},
        "volumeMounts": volume_mounts,
    }
    if k8s.rdma_resource:  # RDMA registers (pins) memory: allow locking it
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK"]}}
    spec: Dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": cluster.stop_grace_seconds,
        "containers": [container],
        "volumes": volumes,
    }
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    if k8s.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": k8s.image_pull_secret}]
    template: Dict[str, Any] = {"spec": spec}
    if k8s.pod_annotations:
        template["metadata"] = {"annotations": dict(k8s.pod_annotations)}
    return template


# A pod evicted or preempted (condition DisruptionTarget) fails its Job with the reason
# PodFailurePolicy; the JobSet then restarts every pod without counting it against
# cluster.max_restarts, and the run resumes from its checkpoint. Crashes do count.
POD_FAILURE_POLICY = {
    "rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]}]
}


def _failure_policy(plan: LaunchPlan) -> Dict[str, Any]:
    return {
        "maxRestarts": plan.cluster.max_restarts,
        "rules": [
            {
                "name": "RestartOnPreemption",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
            }
        ],
    }


def _metadata(plan: LaunchPlan, name: str) -> Dict[str, Any]:
    return {
        "name": name,
        "namespace": plan.cluster.kubernetes.namespace,
        "labels": {"app.kubernetes.io/name": "mm1", "app.kubernetes.io/instance": name},
    }


def jobset_manifest(plan: LaunchPlan) -> Dict[str, Any]:
    container = {
        "name": "trainer",
        "command": _command(plan),
        "ports": [{"name": "rendezvous", "containerPort": plan.cluster.rdzv_port}],
        "env": _rendezvous_env(plan) + _env(plan),
        "resources": _resources(plan),
    }
    nodes = plan.layout.nodes
    job = {
        "parallelism": nodes,
        "completions": nodes,
        "completionMode": "Indexed",  # pod i gets completion index i: its node rank
        "backoffLimit": 0,  # one failed pod fails the Job; the JobSet restarts all of them
        "podFailurePolicy": POD_FAILURE_POLICY,
        "template": _pod_template(plan, container),
    }
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": _metadata(plan, plan.cluster.job_name),
        "spec": {
            "failurePolicy": _failure_policy(plan),
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1, "template": {"spec": job}}],
        },
    }


def trainjob_manifests(plan: LaunchPlan) -> List[Dict[str, Any]]:
    """A namespaced TrainingRuntime (the pod: /dev/shm, RDMA, mounts) and the TrainJob."""
    name, layout = plan.cluster.job_name, plan.layout
    runtime_name = f"{name}-torch-distributed"
    runtime_job = {
        "metadata": {"labels": {ANCESTOR_LABEL: "trainer"}},
        "spec": {
            "podFailurePolicy": POD_FAILURE_POLICY,
            "template": _pod_template(plan, {"name": REPLICATED_JOB}),
        },
    }
    runtime = {
        "apiVersion": TRAINER_API,
        "kind": "TrainingRuntime",
        "metadata": _metadata(plan, runtime_name),
        "spec": {
            "mlPolicy": {
                "numNodes": layout.nodes,
                "torch": {"numProcPerNode": layout.gpus_per_node},
            },
            "template": {
                "spec": {
                    "failurePolicy": _failure_policy(plan),
                    "replicatedJobs": [
                        {"name": REPLICATED_JOB, "replicas": 1, "template": runtime_job}
                    ],
                }
            },
        },
    }
    trainjob = {
        "apiVersion": TRAINER_API,
        "kind": "TrainJob",
        "metadata": _metadata(plan, name),
        "spec": {
            "runtimeRef": {
                "name": runtime_name,
                "apiGroup": "trainer.kubeflow.org",
                "kind": "TrainingRuntime",
            },
            "trainer": {
                "image": plan.cluster.container.image,
                "command": _command(plan),
                "env": _env(plan),  # the PET_* variables come from the Trainer
                "numNodes": layout.nodes,
                "numProcPerNode": layout.gpus_per_node,
                "resourcesPerNode": _resources(plan),
            },
        },
    }
    return [runtime, trainjob]


def _dump(plan: LaunchPlan, target: str, documents: List[Dict[str, Any]]) -> str:
    header = "".join(f"# {line}\n" for line in plan.header(target))
    body = yaml.safe_dump_all(documents, sort_keys=False, width=1000, explicit_start=True)
    return header + body


def render_jobset(plan: LaunchPlan) -> str:
    return _dump(plan, "jobset", [jobset_manifest(plan)])


def render_trainjob(plan: LaunchPlan) -> str:
    return _dump(plan, "trainjob", trainjob_manifests(plan))
