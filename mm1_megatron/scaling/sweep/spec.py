"""A scaling sweep: one YAML that expands into one resolved config per run.

    name: tiny-synthetic
    configs: [configs/debug.yaml]          # stacked like mm1 train --config (overlays too)
    overrides: [training.global_batch_size=8]
    models:                                # sizes: dotted overrides each
      - {name: s1, overrides: {model.llm.hidden_size: 32, model.llm.num_layers: 2}}
      - {name: s2, overrides: {model.llm.hidden_size: 64, model.llm.num_layers: 2}}
    tokens: [100000, 200000]               # training tokens per run (sequences x length)
    learning_rates: mm1                    # MM1's rule per size, or a list of peak LRs
    lr_multipliers: [1.0]                  # scale whichever LR the run gets
    cluster: {gpus: 1, gpu_type: none, target: local}

Every combination of model, token budget and learning rate is a run named
``<model>-<tokens>tok-lr<lr>`` (stable: the same spec gives the same names). A run whose
config does not validate, whose layout does not divide ``cluster.gpus``, or whose
estimated memory per GPU exceeds the GPU's (``mm1 estimate``'s estimate, with
``cluster.memory_margin`` held back) is listed in ``sweep.json`` under ``pruned`` with the
reason, and not written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from mm1_megatron.config import load_config, validate_config
from mm1_megatron.config.layout import check_world_size
from mm1_megatron.config.loader import section_from_dict
from mm1_megatron.config.safe_yaml import parse_yaml
from mm1_megatron.config.schema import MM1Config
from mm1_megatron.models.param_count import count_parameters
from mm1_megatron.training.lr import mm1_peak_lr

logger = logging.getLogger(__name__)

TARGETS = ("local", "slurm", "jobset", "trainjob")
RUNS_DIR = "runs"  # <sweep>/runs/<name>/ holds each run's config, launch file and outputs


@dataclass
class SweepModel:
    name: str
    overrides: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepCluster:
    gpus: int = 1  # processes per run (GPUs, or CPU processes with gpu_type none)
    gpu_type: str = "none"  # h100, h200, a100: prune by estimated memory; none: do not
    target: str = "local"  # the launch files written per run
    memory_margin: float = 0.1  # share of GPU memory kept free when pruning


@dataclass
class SweepSpec:
    name: str
    configs: List[str]
    models: List[SweepModel]
    tokens: List[int]
    learning_rates: Union[str, List[float]] = "mm1"
    lr_multipliers: List[float] = field(default_factory=lambda: [1.0])
    overrides: List[str] = field(default_factory=list)
    cluster: SweepCluster = field(default_factory=SweepCluster)


@dataclass
class PlannedRun:
    name: str
    model: str
    tokens: int
    lr: float
    config: Optional[MM1Config] = None
    reason: str = ""  # why it was pruned ("" when it runs)

    def entry(self) -> Dict[str, Any]:
        """Its line in ``sweep.json``."""
        entry: Dict[str, Any] = {"name": self.name, "label": self.model, "tokens": self.tokens}
        entry["lr"] = self.lr
        if self.reason:
            return {**entry, "reason": self.reason}
        counts = count_parameters(self.config.model)
        training = self.config.training
        entry.update(
            params=counts.total,
            llm_active_non_embedding=counts.llm_active_non_embedding,
            train_steps=training.train_steps,
            sequences=training.train_steps * training.global_batch_size,
            status="planned",
        )
        return entry


def load_spec(path: Union[str, Path]) -> SweepSpec:
    """Read and check a sweep YAML (``ValueError`` naming the field and the fix)."""
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text(), f"sweep spec {path}")
    except OSError as exc:
        raise ValueError(f"cannot read sweep spec {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"sweep spec {path} must be a mapping")
    raw = dict(raw)
    raw["models"] = [_model(item, n) for n, item in enumerate(raw.get("models") or [])]
    raw["cluster"] = section_from_dict(SweepCluster, raw.get("cluster") or {}, "cluster")
    known = {f.name for f in dataclasses.fields(SweepSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"sweep spec {path}: unknown keys {unknown}; known: {sorted(known)}")
    missing = [name for name in ("name", "configs", "models", "tokens") if not raw.get(name)]
    if missing:
        raise ValueError(f"sweep spec {path}: {missing} must be given and non-empty")
    spec = SweepSpec(**raw)
    spec.configs = [_config_path(config, path) for config in spec.configs]
    _check_spec(spec)
    return spec


def _config_path(config: str, spec_path: Path) -> str:
    """A config relative to the working directory, else to the spec's folder."""
    for candidate in (Path(config), spec_path.parent / config):
        if candidate.is_file():
            return str(candidate.resolve())
    raise ValueError(f"sweep spec {spec_path}: config {config} does not exist")


def _model(item: Any, number: int) -> SweepModel:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ValueError(f"models[{number}] needs a 'name' and optional 'overrides' mapping")
    overrides = item.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"models[{number}].overrides must map dotted keys to values")
    return SweepModel(name=item["name"], overrides=dict(overrides))


def _check_spec(spec: SweepSpec) -> None:
    names = [m.name for m in spec.models]
    if len(set(names)) != len(names):
        raise ValueError(f"models: names must be distinct, got {names}")
    if any(not isinstance(t, int) or t <= 0 for t in spec.tokens):
        raise ValueError(f"tokens={spec.tokens} must be positive integers")
    if isinstance(spec.learning_rates, str):
        if spec.learning_rates != "mm1":
            raise ValueError("learning_rates must be 'mm1' (the MM1 rule) or a list of floats")
    elif not spec.learning_rates or any(float(lr) <= 0 for lr in spec.learning_rates):
        raise ValueError(f"learning_rates={spec.learning_rates} must be positive")
    if not spec.lr_multipliers or any(m <= 0 for m in spec.lr_multipliers):
        raise ValueError(f"lr_multipliers={spec.lr_multipliers} must be positive")
    c = spec.cluster
    if c.target not in TARGETS:
        raise ValueError(f"cluster.target={c.target!r} is not one of {TARGETS}")
    if c.gpus < 1 or not 0 <= c.memory_margin < 1:
        raise ValueError("cluster.gpus must be >= 1 and cluster.memory_margin in [0, 1)")


def _override_text(key: str, value: Any) -> str:
    """A dotted override whose value parses back as ``value`` (JSON is flow YAML)."""
    return f"{key}={json.dumps(value)}"


def _token_tag(tokens: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if tokens >= size and tokens % (size // 100 or 1) == 0:
            return f"{tokens / size:g}{unit}"
    return str(tokens)


def plan_runs(spec: SweepSpec, out_dir: Union[str, Path]) -> List[PlannedRun]:
    """Every run of the spec, resolved and checked; pruned ones carry their reason."""
    out_dir = Path(out_dir).resolve()
    runs = []
    for model in spec.models:
        model_overrides = [_override_text(k, v) for k, v in model.overrides.items()]
        base = load_config(spec.configs, [*spec.overrides, *model_overrides])
        for tokens in spec.tokens:
            for lr in _learning_rates(spec, base):
                name = f"{model.name}-{_token_tag(tokens)}tok-lr{lr:.3g}"
                run = PlannedRun(name=name, model=model.name, tokens=tokens, lr=lr)
                try:
                    run.config = _resolve(
                        spec, base, model_overrides, tokens, lr, out_dir / RUNS_DIR / name
                    )
                    run.reason = fit_problem(run.config, spec.cluster)
                except ValueError as exc:
                    run.reason = str(exc).replace("\n", " ")
                runs.append(run)
    duplicates = {r.name for r in runs if sum(o.name == r.name for o in runs) > 1}
    if duplicates:
        raise ValueError(f"runs {sorted(duplicates)} repeat: make the models or LRs distinct")
    return runs


def _learning_rates(spec: SweepSpec, base: MM1Config) -> List[float]:
    if spec.learning_rates == "mm1":
        rates = [mm1_peak_lr(count_parameters(base.model).llm_active_non_embedding)]
    else:
        rates = [float(lr) for lr in spec.learning_rates]
    return [rate * multiplier for rate in rates for multiplier in spec.lr_multipliers]


def _resolve(spec, base, model_overrides, tokens, lr, run_dir: Path) -> MM1Config:
    tokens_per_step = base.training.global_batch_size * base.training.seq_length
    steps = max(1, math.ceil(tokens / tokens_per_step))
    overrides = [
        *spec.overrides,
        *model_overrides,
        f"training.train_steps={steps}",
        "optimizer.lr_rule=fixed",
        f"optimizer.lr={lr!r}",
        f"logging.output_dir={run_dir}",
    ]
    if base.optimizer.warmup_steps >= steps:
        overrides.append(f"optimizer.warmup_steps={max(0, steps // 10)}")
    return validate_config(load_config(spec.configs, overrides))


def fit_problem(cfg: MM1Config, cluster: SweepCluster) -> str:
    """Why ``cfg`` cannot run on the cluster ("" when it can): layout or memory."""
    try:
        check_world_size(cfg.parallel, cluster.gpus)
    except ValueError as exc:
        return f"layout: {exc}"
    if cluster.gpu_type == "none":
        return ""
    from mm1_megatron.scaling.estimate.hardware import gpu_type
    from mm1_megatron.scaling.estimate.memory import estimate_memory
    from mm1_megatron.scaling.estimate.workload import default_workload

    gpu = gpu_type(cluster.gpu_type)
    peak = estimate_memory(cfg, default_workload(cfg), num_gpus=cluster.gpus).peak
    budget = gpu.memory_bytes * (1 - cluster.memory_margin)
    if peak > budget:
        return (
            f"memory: needs {peak / 2**30:.1f} GiB per GPU, {gpu.name} has "
            f"{gpu.memory_bytes / 2**30:.1f} GiB ({cluster.memory_margin:.0%} kept free)"
        )
    return ""


def spec_summary(spec: SweepSpec) -> Dict[str, Any]:
    return dataclasses.asdict(spec)


def describe(runs: Sequence[PlannedRun]) -> str:
    kept = [r for r in runs if not r.reason]
    return f"{len(kept)} runs planned, {len(runs) - len(kept)} pruned"
