"""Fail fast: the data root, a stage's inputs and the tracking store are checked in seconds, before anything
slow, each with one line naming what is wrong."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from tasks.errors import DataError, MissingInput, TrackingStoreError
from tasks.params import DataParams
from tasks.preflight import (
    MLFLOW_HTTP_LIMITS,
    cap_mlflow_http_retries,
    check_data_source,
    check_stage_inputs,
    check_tracking_store,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_dead_tracking_server_is_named_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(TrackingStoreError) as raised:
        check_tracking_store(uri)
    assert time.monotonic() - started < 10
    assert str(raised.value).startswith(f"MLFLOW_TRACKING_URI = {uri}: no MLflow server answers")
    assert "unset MLFLOW_TRACKING_URI" in str(raised.value)


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A real HTTP server on 127.0.0.1 answering each path with the status the test sets (404 otherwise)."""
    statuses: dict[str, int] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            self.send_response(statuses.get(self.path.split("?")[0], 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", statuses
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_an_mlflow_server_passes_by_health_or_by_its_api(http_server: tuple[str, dict[str, int]]) -> None:
    uri, statuses = http_server
    statuses["/health"] = 200
    check_tracking_store(uri)
    del statuses["/health"]
    statuses["/api/2.0/mlflow/experiments/search"] = 401  # behind authentication: it answers
    check_tracking_store(uri + "/")


def test_a_server_that_is_not_mlflow_is_named(http_server: tuple[str, dict[str, int]]) -> None:
    uri, _ = http_server
    with pytest.raises(TrackingStoreError, match=r"answers HTTP 404, not as an MLflow tracking server"):
        check_tracking_store(uri)


def test_a_sqlite_store_needs_an_existing_folder(tmp_path: Path) -> None:
    check_tracking_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    missing = tmp_path / "no" / "such"
    with pytest.raises(TrackingStoreError, match=f"folder {missing} does not exist"):
        check_tracking_store(f"sqlite:///{missing / 'mlflow.db'}")


def test_a_database_server_that_does_not_answer_is_named() -> None:
    port = free_port()
    with pytest.raises(TrackingStoreError, match=f"the database at 127.0.0.1:{port} does not answer"):
        check_tracking_store(f"postgresql+psycopg2://user@127.0.0.1:{port}/mlflow")


def test_mlflow_http_retries_are_capped_but_a_users_values_win(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in MLFLOW_HTTP_LIMITS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    cap_mlflow_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"


def test_data_roots_are_checked_for_existence_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.root = '.*nowhere': no such folder"):
        check_data_source(DataParams(source="folder", root=str(tmp_path / "nowhere")))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "leaf.jpg").touch()
    with pytest.raises(DataError, match="expected one sub-folder per class"):
        check_data_source(DataParams(source="folder", root=str(tmp_path / "flat")))
    with pytest.raises(DataError, match=r"csv layout needs train.csv and train_images/"):
        check_data_source(DataParams(source="csv", root=str(tmp_path / "flat")))

    (tmp_path / "classes" / "cbb").mkdir(parents=True)
    assert check_data_source(DataParams(source="folder", root=str(tmp_path / "classes"))) == tmp_path / "classes"
    (tmp_path / "kaggle" / "train_images").mkdir(parents=True)
    (tmp_path / "kaggle" / "train.csv").write_text("image_id,label\n")
    assert check_data_source(DataParams(source="csv", root=str(tmp_path / "kaggle"))) == tmp_path / "kaggle"
    assert check_data_source(DataParams(source="synthetic")) is None


def test_a_stage_whose_input_is_missing_names_the_stage_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASSAVA_WORKSPACE", str(tmp_path))
    check_stage_inputs("acquire")
    with pytest.raises(MissingInput, match=r"^train: data/prepared is missing: run the prepare stage first"):
        check_stage_inputs("train")
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    check_stage_inputs("train")
    with pytest.raises(MissingInput, match="models/model/model.keras is missing: run the train stage first"):
        check_stage_inputs("evaluate")
