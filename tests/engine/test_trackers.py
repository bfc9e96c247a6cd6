"""output.trackers: TensorBoard, W&B (offline) and MLflow (a file store) get the training scalars, the per-stage
accuracies, the final metrics and the config; no network."""

import sys

import pytest

from evolora.config import build_config
from evolora.engine import run
from evolora.errors import ConfigError


def test_every_tracker_gets_R_the_final_metrics_and_the_config(tmp_path, tiny_config, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_config(tmp_path, output={"tensorboard": True, "trackers": ["wandb", "mlflow"]}, train={"log_every": 1})
    record = run(build_config(raw), log=lambda _: None)
    run_dir = tmp_path / "run"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name("tiny")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.data.metrics["final/AP"] == pytest.approx(record["metrics"]["AP"])
    assert logged.data.params["train.lr"] == "0.001" and logged.data.params["method.name"] == "seq_lora"
    first_task = record["stream"]["tasks"][0]
    history = client.get_metric_history(logged.info.run_id, f"eval/acc/{first_task}")
    assert [(h.step, h.value) for h in history] == [(i + 1, row[0]) for i, row in enumerate(record["R"])]
    assert client.get_metric_history(logged.info.run_id, "train/loss")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars(f"eval/acc/{first_task}")] == pytest.approx([row[0] for row in record["R"]])
    assert events.Scalars("final/BWT")[0].value == pytest.approx(record["metrics"]["BWT"])
    assert len(events.Scalars("train/loss")) == sum(s["train"]["steps"] for s in record["stages"])

    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
    # a tracker's folder is evolora's: the run folder can still be replaced
    run(build_config(raw, ["output.overwrite=true", "output.trackers=[]"]), log=lambda _: None)


def test_a_tracker_without_its_package_is_one_line(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    raw = tiny_config(tmp_path, output={"trackers": ["wandb"]})
    with pytest.raises(ConfigError, match=r"output.trackers: wandb needs the wandb package: pip install wandb"):
        run(build_config(raw), log=lambda _: None)
    assert not (tmp_path / "run").exists()
