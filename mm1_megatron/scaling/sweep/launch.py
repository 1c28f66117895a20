"""Cluster launch files for the runs of a sweep (``cluster.target`` slurm, jobset or
trainjob), rendered by ``mm1 launch`` (``mm1_megatron/launch``).

Each run's files come from the sweep's configs (whose overlay holds the ``cluster:``
section: nodes, GPUs per node, container, ...) with the run's resolved ``config.yaml``
stacked last, so the launch checks (layout, batch split, YAML, shellcheck) run per run.
The sweep folder must be on a filesystem the cluster's nodes share, at the same path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

CONFIG_FILE = "config.yaml"


def write_cluster_launch(folder: Path, configs: Sequence[str], gpus: int, target: str) -> None:
    """Render ``target``'s launch file into the run's ``folder``."""
    from mm1_megatron.launch.plan import plan_launch
    from mm1_megatron.launch.render import write_rendered

    plan = plan_launch([*configs, str(Path(folder) / CONFIG_FILE)])
    world = plan.cluster.nodes * plan.cluster.gpus_per_node
    if world != gpus:
        raise ValueError(
            f"cluster.gpus={gpus} in the sweep spec, but its overlay's cluster section asks "
            f"for {plan.cluster.nodes} nodes x {plan.cluster.gpus_per_node} GPUs = {world}: "
            "make them equal"
        )
    write_rendered(plan, [target], Path(folder))
