"""W&B (offline mode) and MLflow (a file store) record a debug run's scalars and config,
and a resumed run continues the same tracker run; a tracker that fails never stops
training. What W&B wrote is read back from its ``.wandb`` transaction log
(``wandb_log_records``), what MLflow wrote through its client."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tests.conftest import TINY_OVERRIDES
from tests.in_process import train_in_process

LEVELDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf records
RECORD_HEADER = 7  # crc32c (4), length (2), kind (1)
FULL, LAST = 1, 4
# Few-shot evaluation every 2 steps: its scores reach the trackers as a table too.
EVAL = ["eval.interval=2", "eval.tasks=[synthetic_vqa]", "eval.shots=[0]", "eval.limit=2"]


def wandb_log_records(path: Path):
    """The protobuf ``Record``s of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pending = 7, b""
    while pos + RECORD_HEADER <= len(data):
        left = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        if left < RECORD_HEADER:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + RECORD_HEADER])
        pos += RECORD_HEADER
        pending += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B keeps some keys as paths


def _train(out: Path, steps: int, *overrides: str):
    result = train_in_process(
        f"logging.output_dir={out}",
        *TINY_OVERRIDES,
        f"training.train_steps={steps}",
        f"checkpoint.save_dir={out / 'ckpt'}",
        "checkpoint.save_interval=2",
        "optimizer.schedule_on_resume=config",  # the resume runs on to step 4
        "logging.tensorboard=false",
        *overrides,
    )
    assert result.returncode == 0, result.log[-3000:]
    return result


def _jsonl(out: Path):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def _jsonl_losses(out: Path):
    return {step: row["loss"] for step, row in _jsonl(out).items()}


def test_wandb_offline_records_the_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb = [
        "logging.wandb.enabled=true",
        "logging.wandb.mode=offline",
        "logging.wandb.tags=[a]",
        *EVAL,
    ]
    _train(tmp_path, 2, *wandb)
    _train(tmp_path, 4, *wandb)
    run_id = json.loads((tmp_path / "trackers.json").read_text())["wandb"]
    logs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(log.name == f"run-{run_id}.wandb" for log in logs)
    history, configs = {}, []
    for log in logs:
        for record in wandb_log_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {_key(item): json.loads(item.value_json) for item in record.history.item}
                if "_step" in items:  # a step's logged values (one or several records)
                    history.setdefault(items["_step"], {}).update(items)
            elif kind == "run" and record.run.config.update:
                update = record.run.config.update
                configs.append({item.key: json.loads(item.value_json) for item in update})
                assert list(record.run.tags) == ["a"] and record.run.display_name == tmp_path.name
    assert sorted(history) == [1, 2, 3, 4]
    assert {step: row["loss"] for step, row in history.items()} == pytest.approx(
        _jsonl_losses(tmp_path)
    )
    assert "lr" in history[3] and "grad_norm" in history[3]
    # The evaluation's table: a table file among the run's files, its row the logged score.
    for step in (2, 4):
        row = history[step]  # W&B keeps the table's fields as paths under its name
        assert row["eval/scores/_type"] == "table-file" and row["eval/scores/nrows"] == 1
        (path,) = (tmp_path / "wandb").glob(f"offline-run-*/files/{row['eval/scores/path']}")
        (row,) = json.loads(path.read_text())["data"]
        assert row == [step, "synthetic_vqa", 0, history[step]["eval/synthetic_vqa/0shot"]]
    # Each run's resolved config: the resume's runs on to step 4.
    assert [config["training"]["train_steps"] for config in configs] == [2, 4]
    assert configs[0]["model"]["llm"]["hidden_size"] == 32


def test_mlflow_file_store_records_the_run_and_a_resume_continues_it(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for a database
    uri = (tmp_path / "mlruns").as_uri()
    settings = [
        "logging.mlflow.enabled=true",
        f"logging.mlflow.tracking_uri={uri}",
        "logging.mlflow.experiment=debug",
        "logging.mlflow.tags={team: vision}",
        *EVAL,
    ]
    _train(tmp_path, 2, *settings)
    _train(tmp_path, 4, *settings)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("debug").experiment_id])
    assert run.info.run_id == json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert run.info.status == "FINISHED" and run.data.tags["team"] == "vision"
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert losses == pytest.approx(_jsonl_losses(tmp_path))
    assert sorted(losses) == [1, 2, 3, 4]
    # Per-source losses, "/" written as "." (MLflow's file store keeps a file per key).
    assert len(client.get_metric_history(run.info.run_id, "loss.caption")) == 4
    assert run.data.params["training.train_steps"] == "2"
    assert run.data.params["model.llm.hidden_size"] == "32"
    saved = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert "train_steps: 2" in saved.read_text()
    # Each evaluation's few-shot scores as a table, equal to the logged scalars.
    logged = _jsonl(tmp_path)
    for step in (2, 4):
        table = client.download_artifacts(
            run.info.run_id, f"eval/step_{step:08d}.json", str(tmp_path / f"table{step}")
        )
        (row,) = json.loads(Path(table).read_text())["scores"]
        assert row == {
            "step": step,
            "task": "synthetic_vqa",
            "shots": 0,
            "score": logged[step]["eval/synthetic_vqa/0shot"],
        }


def test_a_tracker_that_cannot_start_warns_and_training_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the store's folder should be\n")
    result = _train(
        tmp_path / "run",
        2,
        "logging.mlflow.enabled=true",
        f"logging.mlflow.tracking_uri={blocker.as_uri()}/mlruns",
    )
    assert "mlflow: could not start" in result.log
    assert sorted(_jsonl_losses(tmp_path / "run")) == [1, 2]
