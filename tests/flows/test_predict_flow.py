"""The prediction flow under Prefect (a real temporary Prefect server): same core, same CSVs, a completed flow run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.tasks.test_predict import register_champion, write_leaf_folder
from tests.helpers import log_model_run, open_store, oracle_model, save_model_dir

pytestmark = [pytest.mark.slow, pytest.mark.server]  # a real temporary Prefect server


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def test_flow_predicts_a_folder_with_the_champion(workspace: Path, prefect_server) -> None:
    from flows.predict import predict_flow

    run_id = log_model_run(save_model_dir(oracle_model(), workspace / "oracle"), open_store(), 0.9, "v1")
    register_champion(run_id, "flow-classifier")
    expected = write_leaf_folder(workspace / "leaves")

    state = predict_flow(
        folder=str(workspace / "leaves"), model_uri="models:/flow-classifier@champion",
        output=str(workspace / "predictions.csv"), batch_size=2, return_state=True,
    )

    assert state.is_completed()
    result = state.result()
    assert result["predicted"] == 4 and result["run_id"] == run_id
    assert {item["file"] for item in result["skipped"]} == {"empty.jpg", "truncated.jpg", "notes.jpg"}
    with (workspace / "predictions.csv").open() as handle:
        assert {row["file"]: row["class"] for row in csv.DictReader(handle)} == expected
    assert Path(result["skipped_csv"]) == workspace / "predictions.skipped.csv"
