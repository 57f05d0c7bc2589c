"""Source → target, end to end: the pretraining flow (real Prefect) logs a source run, a target run starts from
its backbone by `runs:/` URI, records the lineage tag and ends with a loadable, servable model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tasks.backbones import TAG_SOURCE_RUN
from tasks.params import load_params
from tasks.prepared import PreparedData

SOURCE = "pretrain.overrides=[data.seed=5, data.synthetic.images_per_class=12, tracking.experiment_name=cassava-pretrain]"


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.mark.slow
def test_a_target_run_starts_from_a_pretrained_source_run_and_serves(workspace: Path, prefect_server) -> None:
    from flows.pretrain import pretrain_flow
    from tasks.data import run_acquire, run_prepare
    from tasks.train import run_train

    record = pretrain_flow(overrides=[SOURCE])
    source_run = MlflowClient().get_run(record["run_id"])
    assert source_run.info.status == "FINISHED" and source_run.data.params["data.seed"] == "5"
    assert json.loads((workspace / "models" / "pretrained.json").read_text())["run_id"] == record["run_id"]
    assert not (workspace / "data" / "prepared").exists()  # the source had its own workspace folder

    params = load_params(overrides=[
        f"model.backbone_weights={record['model_uri']}", "transfer.head_epochs=2", "transfer.fine_tune_epochs=1",
        "transfer.fine_tune_layers=3",
    ])
    run_id = run_prepare(params, run_acquire(params))
    run_id = run_train(params, run_id)

    target = MlflowClient().get_run(run_id)
    assert target.info.status == "FINISHED"
    assert target.data.tags[TAG_SOURCE_RUN] == record["run_id"]
    phases = [metric.value for metric in MlflowClient().get_metric_history(run_id, "phase")]
    assert phases == [1, 1, 2]
    images, _ = PreparedData(workspace / "data" / "prepared").split("test")
    served = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    probabilities = np.asarray(served.predict(np.asarray(images[:3], dtype=np.float32)))
    assert probabilities.shape == (3, 5) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_the_transfer_study_logs_a_parent_run_with_the_comparison(workspace: Path, prefect_server) -> None:
    from flows.transfer_study import transfer_study

    result = transfer_study(sizes=[4], seeds=[0], epochs=2, overrides=[SOURCE])

    assert [(row["arm"], row["per_class"], row["seeds"]) for row in result["comparison"]] == [
        ("scratch", 4, 1), ("pretrained", 4, 1)]
    parent = MlflowClient().get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    source_run = json.loads((workspace / "models" / "pretrained.json").read_text())["run_id"]
    assert parent.data.tags[TAG_SOURCE_RUN] == source_run
    assert {"scratch.n4.mean", "pretrained.n4.mean", "gain.n4"} <= set(parent.data.metrics)
    assert all(0.0 <= parent.data.metrics[key] <= 1.0 for key in ("scratch.n4.mean", "pretrained.n4.mean"))
    artifacts = {item.path for item in MlflowClient().list_artifacts(result["run_id"], "study")}
    assert artifacts == {"study/trials.csv", "study/comparison.csv", "study/comparison.png"}
