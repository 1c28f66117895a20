"""Experiment trackers: Weights & Biases and MLflow (``logging.wandb``, ``logging.mlflow``).

On the logging rank, ``MetricsLogger`` hands every step's scalars (what TensorBoard and
``metrics.jsonl`` get, the periodic evaluation's scores among them) to each tracker
enabled here. A new run records the resolved config (W&B: the run's config; MLflow: its
flattened params and ``config.yaml`` as an artifact), and each periodic evaluation its
few-shot scores as a table (W&B: ``eval/scores``; MLflow: ``eval/step_<n>.json``). The
trackers' run ids are kept in ``<logging.output_dir>/trackers.json``, so a resumed run
continues the same tracker runs.

A tracker that fails (no network, bad credentials, a full disk) warns once and is turned
off for the rest of the run: it never stops training. A tracker that is enabled but not
installed is refused before training starts (``validate_environment``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

import yaml

from mm1_megatron.config.loader import config_to_dict

logger = logging.getLogger(__name__)

RUN_IDS_FILE = "trackers.json"
EVAL_TABLE = "eval/scores"  # the W&B table of each evaluation's few-shot scores


class EvalRow(NamedTuple):
    step: int
    task: str
    shots: int
    score: float


MLFLOW_BATCH = 100  # MLflow's limit on params (and a safe one on metrics) per log_batch
MLFLOW_PARAM_CHARS = 500  # longer param values are cut (MLflow caps their length)


class GuardedTracker:
    """Calls into one tracker; its first failure warns once and turns it off."""

    def __init__(self, name: str, tracker):
        self.name, self.tracker = name, tracker

    def _call(self, method: str, *args) -> None:
        if self.tracker is None:
            return
        try:
            getattr(self.tracker, method)(*args)
        except Exception as error:  # any failure of a tracker's service or client
            logger.warning(
                "%s: %s failed (%s: %s); it is off for the rest of this run, training goes on",
                self.name,
                method,
                type(error).__name__,
                error,
            )
            self.tracker = None

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        self._call("log", step, scalars)

    def log_evaluation(self, step: int, rows: List[EvalRow]) -> None:
        self._call("log_evaluation", step, rows)

    def close(self) -> None:
        self._call("close")
        self.tracker = None


class WandbRun:
    def __init__(self, settings, config: Dict, output_dir: Path, run_id: Optional[str]):
        import wandb

        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.run_name or output_dir.name,
            tags=list(settings.tags),
            mode=settings.mode,
            dir=str(output_dir),
            id=run_id,
            resume="allow",
            config=config,
        )
        self.run_id = self.run.id

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def log_evaluation(self, step: int, rows: List[EvalRow]) -> None:
        import wandb

        table = wandb.Table(columns=list(EvalRow._fields), data=[list(row) for row in rows])
        self.run.log({EVAL_TABLE: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowRun:
    def __init__(
        self, settings, config: Dict, config_yaml: str, output_dir: Path, run_id: Optional[str]
    ):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        if run_id is not None:  # a resumed run: the same MLflow run, running again
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(settings.experiment)
        )
        run = self.client.create_run(
            experiment_id, run_name=settings.run_name or output_dir.name, tags=dict(settings.tags)
        )
        self.run_id = run.info.run_id
        self._log_config(config, config_yaml)

    def _log_config(self, config: Dict, config_yaml: str) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, str(value)[:MLFLOW_PARAM_CHARS]) for key, value in _flatten(config).items()
        ]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_BATCH])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log(self, step: int, scalars: Dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(_mlflow_key(name), float(value), now, step)
            for name, value in scalars.items()
            if value is not None
        ]
        for start in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + MLFLOW_BATCH])

    def log_evaluation(self, step: int, rows: List[EvalRow]) -> None:
        scores = [row._asdict() for row in rows]
        self.client.log_dict(self.run_id, {"step": step, "scores": scores}, _eval_artifact(step))

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _eval_artifact(step: int) -> str:
    return f"eval/step_{step:08d}.json"


def evaluation_rows(step: int, metrics: Dict[str, float]) -> List[EvalRow]:
    """The few-shot scores among a step's metrics (``eval/<task>/<k>shot``) as table rows."""
    rows = []
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2].endswith("shot"):
            rows.append(EvalRow(step, parts[1], int(parts[2][: -len("shot")]), float(value)))
    return rows


def _mlflow_key(name: str) -> str:
    """``loss/caption`` -> ``loss.caption``: MLflow's file store keeps a metric as a file
    named by its key, so ``loss`` and ``loss/caption`` would clash. Other characters
    MLflow refuses (it takes letters, digits and ``_-. :``) become ``_``."""
    return "".join(c if c.isalnum() or c in "_-. :" else "_" for c in name.replace("/", "."))


def _flatten(config: Dict, prefix: str = "") -> Dict[str, object]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def open_trackers(cfg, output_dir: Path, *, resumed: bool) -> List[GuardedTracker]:
    """The enabled trackers (logging rank only), each continuing its run when ``resumed``
    and ``trackers.json`` names one. A tracker that fails to start warns and is left out."""
    if not (cfg.logging.wandb.enabled or cfg.logging.mlflow.enabled):
        return []
    config = config_to_dict(cfg)
    config_yaml = yaml.safe_dump(config, sort_keys=False)
    output_dir = Path(output_dir)
    ids_path = output_dir / RUN_IDS_FILE
    known = json.loads(ids_path.read_text()) if resumed and ids_path.exists() else {}
    trackers, ids = [], {}
    for name, settings in (("wandb", cfg.logging.wandb), ("mlflow", cfg.logging.mlflow)):
        if not settings.enabled:
            continue
        try:
            if name == "wandb":
                run = WandbRun(settings, config, output_dir, known.get(name))
            else:
                run = MlflowRun(settings, config, config_yaml, output_dir, known.get(name))
        except Exception as error:  # any failure of a tracker's service or client
            logger.warning(
                "%s: could not start (%s: %s); training goes on without it",
                name,
                type(error).__name__,
                error,
            )
            continue
        ids[name] = run.run_id
        trackers.append(GuardedTracker(name, run))
        logger.info("%s: logging to run %s", name, run.run_id)
    if ids:
        output_dir.mkdir(parents=True, exist_ok=True)
        ids_path.write_text(json.dumps({**known, **ids}, indent=1) + "\n")
    return trackers
