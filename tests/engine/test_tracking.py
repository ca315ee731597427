"""Experiment tracking: a run logged to a local MLflow store holds the run's metrics (the same
values as metrics.csv), its config as parameters, and ends finished; Lightning's CSV logger;
unknown trackers refused by name."""

import csv

import pytest

from tests.engine.test_trainer import run


def test_an_mlflow_run_holds_the_metrics_the_config_and_its_status(tmp_path):
    pytest.importorskip("mlflow", reason="logger=mlflow needs mlflow-skinny (a dev dependency)")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run(tmp_path / "tracked", "method.max_steps=3", "logger=[tensorboard,csv,mlflow]", f"mlflow.tracking_uri={store}",
                 "mlflow.experiment=tests")  # fmt: skip
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("tests")
    (logged,) = client.search_runs([experiment.experiment_id])
    assert logged.info.run_name == "tracked" and logged.info.status == "FINISHED"
    assert logged.data.params["method.optimizer.lr"] == "0.001" and logged.data.params["seed"] == "42"
    with result.metrics_csv.open() as rows:
        rows = [r for r in csv.DictReader(rows) if r.get("train/loss")]
    history = client.get_metric_history(logged.info.run_id, "train/loss")
    assert [int(m.step) for m in history] == [int(r["step"]) for r in rows] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([float(r["train/loss"]) for r in rows], rel=1e-6)
    assert (tmp_path / "tracked" / "csv" / "metrics.csv").is_file() and any((tmp_path / "tracked" / "tensorboard").iterdir())


def test_an_unknown_tracker_is_refused_before_the_run(tmp_path):
    from tunelab.errors import UsageError

    with pytest.raises(UsageError, match="neptune unknown; choose from tensorboard, csv, mlflow, wandb"):
        run(tmp_path / "bad", "method.max_steps=1", "logger=[tensorboard,neptune]")


def test_a_tracker_that_is_not_installed_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    from tunelab.errors import UsageError

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(UsageError, match="pip install wandb"):
        run(tmp_path / "no-wandb", "method.max_steps=1", "logger=[wandb]")
    assert not (tmp_path / "no-wandb" / "checkpoints").exists()
