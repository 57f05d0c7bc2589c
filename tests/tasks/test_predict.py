"""Prediction on a folder with unreadable files, the command line, and the champion served over HTTP by MLflow."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from tasks.errors import run_entry
from tasks.predict import app, predict_folder
from tasks.names import CHAMPION_ALIAS
from tests.helpers import (
    CLASS_LEVELS,
    CLASS_NAMES,
    IMAGE_SIZE,
    log_model_run,
    module_workspace,
    oracle_model,
    save_model_dir,
)

MODEL_NAME = "cassava-test-classifier"
SERVER_START_SECONDS = 120


@dataclass(frozen=True)
class Champion:
    run_id: str
    tracking_uri: str


def register_champion(run_id: str, model_name: str) -> None:
    version = mlflow.register_model(f"runs:/{run_id}/model", model_name)
    MlflowClient().set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)


def write_leaf_folder(folder: Path) -> dict[str, str]:
    """Readable images of several sizes, modes and formats (file → expected class), and three unreadable files."""
    expected = {"a_cbb.png": "cbb", "b_cmd.jpg": "cmd", "c_healthy.jpg": "healthy", "nested/d_cmd.png": "cmd"}
    (folder / "nested").mkdir(parents=True)
    Image.new("RGB", (30, 20), (CLASS_LEVELS[0],) * 3).save(folder / "a_cbb.png")
    Image.new("L", (20, 30), CLASS_LEVELS[1]).save(folder / "b_cmd.jpg", quality=95)
    Image.new("RGB", (12, 12), (CLASS_LEVELS[2],) * 3).save(folder / "c_healthy.jpg", quality=95)
    Image.new("RGBA", (16, 16), (CLASS_LEVELS[1],) * 3 + (255,)).save(folder / "nested/d_cmd.png")

    (folder / "empty.jpg").touch()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    (folder / "whole.jpg").unlink()
    (folder / "notes.jpg").write_text("field notes, not a photo\n")
    return expected


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Champion]:
    """An oracle model (right on uniform grey images) logged in a run and registered as champion."""
    root = tmp_path_factory.mktemp("predict")
    with module_workspace(root) as experiment_id:
        run_id = log_model_run(save_model_dir(oracle_model(), root / "oracle"), experiment_id, 0.9, "v1")
        register_champion(run_id, MODEL_NAME)
        yield Champion(run_id, mlflow.get_tracking_uri())


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_predicts_readable_files_and_lists_unreadable_ones(champion: Champion, tmp_path: Path) -> None:
    expected = write_leaf_folder(tmp_path / "leaves")
    output = tmp_path / "out" / "predictions.csv"

    summary = predict_folder(f"models:/{MODEL_NAME}@champion", tmp_path / "leaves", output, batch_size=3)

    assert summary.run_id == champion.run_id and summary.class_names == CLASS_NAMES
    assert summary.image_size == IMAGE_SIZE and summary.predicted == 4
    rows = _read_csv(output)
    assert list(rows[0]) == ["file", "class", "confidence", "p_cbb", "p_cmd", "p_healthy"]
    assert {row["file"]: row["class"] for row in rows} == expected
    for row in rows:
        probabilities = [float(row[f"p_{name}"]) for name in CLASS_NAMES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert float(row["confidence"]) == max(probabilities)
    skipped = {row["file"]: row["reason"] for row in _read_csv(summary.skipped_csv)}
    assert summary.skipped_csv == tmp_path / "out" / "predictions.skipped.csv"
    assert skipped.keys() == {"empty.jpg", "truncated.jpg", "notes.jpg"}
    assert skipped["empty.jpg"] == "zero-byte file"
    assert skipped["truncated.jpg"].startswith("truncated image")
    assert skipped["notes.jpg"] == "not an image (unrecognised format)"
    assert {(item.file, item.reason) for item in summary.skipped} == set(skipped.items())


@pytest.mark.slow
def test_entries_that_are_not_image_files_are_listed_with_their_reason(champion: Champion, tmp_path: Path) -> None:
    leaves = tmp_path / "leaves"
    (leaves / "y.jpg").mkdir(parents=True)  # a folder named like a photo
    Image.new("RGB", (12, 12), (CLASS_LEVELS[2],) * 3).save(leaves / "y.jpg" / "inside.png")
    (leaves / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")  # a link whose photo was deleted
    Image.new("RGB", (12, 12), (CLASS_LEVELS[0],) * 3).save(leaves / "a.png")

    summary = predict_folder(f"runs:/{champion.run_id}/model", leaves, tmp_path / "predictions.csv")

    assert {row["file"]: row["class"] for row in _read_csv(tmp_path / "predictions.csv")} == {
        "a.png": "cbb", "y.jpg/inside.png": "healthy"}
    assert {row["file"]: row["reason"] for row in _read_csv(summary.skipped_csv)} == {
        "y.jpg": "a folder, not an image file (the files inside it are predicted)",
        "gone.jpg": "a broken link",
    }


@pytest.mark.slow
def test_command_line_with_a_run_model_uri(champion: Champion, tmp_path: Path) -> None:
    write_leaf_folder(tmp_path / "leaves")
    output = tmp_path / "leaves" / "predictions.csv"  # inside the folder: a second run must not read it as an image

    for _ in range(2):
        result = CliRunner().invoke(
            app, [str(tmp_path / "leaves"), "--model", f"runs:/{champion.run_id}/model", "--output", str(output)]
        )
        assert result.exit_code == 0, result.output
    assert "predicted 4 images" in result.output and "skipped 3 unreadable files" in result.output
    assert "━" not in result.output and "Downloading artifacts" not in result.output  # no Keras or MLflow bars
    assert len(_read_csv(output)) == 4 and len(_read_csv(tmp_path / "leaves" / "predictions.skipped.csv")) == 3


@pytest.mark.slow
def test_command_line_reports_a_missing_model_in_one_line_with_exit_2(
        champion: Champion, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "leaves").mkdir()
    with pytest.raises(SystemExit) as exited:
        run_entry(lambda: app([str(tmp_path / "leaves"), "--model", "models:/no-such-model@champion"],
                              prog_name="python -m tasks.predict"))
    assert exited.value.code == 2
    assert capsys.readouterr().err == (
        f"error: model models:/no-such-model@champion: Registered Model with name=no-such-model not found in "
        f"{champion.tracking_uri}; train and register one (python3 dev.py run), or pass --model "
        "runs:/<run id>/model or models:/<name>/<version>\n"
    )


def test_help_answers_without_loading_tensorflow_or_mlflow() -> None:
    script = (
        "import sys\n"
        "from tasks.predict import app\n"
        "try:\n"
        "    app(['--help'], prog_name='python -m tasks.predict')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('HEAVY', sorted(name for name in ('tensorflow', 'keras', 'mlflow') if name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert "--model" in result.stdout and "--output" in result.stdout
    assert "HEAVY []" in result.stdout


# ---- serving ------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_ping(url: str, server: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"no answer on {url} after {SERVER_START_SECONDS} s:\n{log_file.read_text()[-3000:]}")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(server: subprocess.Popen) -> None:
    """End the server's whole process group (the CLI and the uvicorn it starts): SIGTERM, then SIGKILL to
    whatever is still there after 20 s. Waiting for the group, not the CLI: uvicorn may outlive its parent."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while server.poll() is None or _group_alive(server.pid):  # poll() reaps the CLI, so it stops counting
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
            return
        time.sleep(0.2)


@pytest.mark.server  # mlflow models serve
def test_served_champion_returns_class_probabilities(champion: Champion, tmp_path: Path) -> None:
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion.tracking_uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log_file = tmp_path / "serve.log"
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL_NAME}@champion",
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with log_file.open("w") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_ping(f"http://127.0.0.1:{port}/ping", server, log_file)
        images = [np.full((IMAGE_SIZE, IMAGE_SIZE, 3), level, dtype=np.float32).tolist() for level in CLASS_LEVELS]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": images}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = np.asarray(json.load(response)["predictions"])
    finally:
        _stop(server)
    assert predictions.shape == (len(CLASS_LEVELS), len(CLASS_NAMES))
    assert np.allclose(predictions.sum(axis=1), 1.0, atol=1e-4)
    assert predictions.argmax(axis=1).tolist() == [0, 1, 2]
