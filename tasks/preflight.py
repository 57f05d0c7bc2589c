"""Fail fast: checks that need no data and take well under a second, run by every entry before anything slow
(importing TensorFlow or Prefect, starting a Prefect server, reading images).

- the data root exists and its layout is recognised (folder: class sub-folders; csv: train.csv + train_images/);
- a stage's inputs exist (an earlier stage has run);
- the tracking store answers: an http(s) server is probed with a short timeout, a SQLite store's folder must
  exist and be writable, a database server must accept a connection.

Each failure is a `UserError` whose one-line message names what is wrong and what to do. This module imports
neither MLflow nor Prefect (the probe uses the standard library), so a dead server is reported in seconds.
"""

from __future__ import annotations

import argparse
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

from tasks.errors import DataError, MissingInput, TrackingStoreError
from tasks.params import DataParams, Params, load_params, tracking_root, workspace_root

PROBE_TIMEOUT_SECONDS = 4.0
# MLflow's HTTP client retries a refused connection 7 times with exponential back-off and waits up to 120 s
# per request: minutes before a run against a dead server fails. These keep a failure to seconds; a user's
# own values win.
MLFLOW_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}

# What each stage reads, and which stage writes it (a stage not listed reads nothing another stage writes).
STAGE_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "prepare": (("data/raw", "acquire"),),
    "train": (("data/prepared", "prepare"),),
    "evaluate": (("data/prepared", "prepare"), ("models/model/model.keras", "train")),
    "register": (("data/prepared", "prepare"), ("reports/evaluation.html", "evaluate")),
}


def data_root(data: DataParams) -> Path:
    """`data.root` as a path: relative ones are from the workspace (the repository root by default)."""
    root = Path(data.root or "")
    return root if root.is_absolute() else workspace_root() / root


def check_data_source(data: DataParams) -> Path | None:
    """The local data root of a folder or csv source, once it is known to exist in a recognised layout."""
    if data.source not in ("folder", "csv"):
        return None  # embedded sources: nothing on disk to check
    root = data_root(data)
    if not root.is_dir():
        raise DataError(f"data.root = {data.root!r}: no such folder ({root}); point data.root at your images, "
                        f"e.g. -S data.root=/data/icassava/train")
    if data.source == "folder":
        if not any(child.is_dir() and not child.name.startswith(".") for child in root.iterdir()):
            raise DataError(f"data.root = {root}: expected one sub-folder per class (<root>/<class>/*.jpg), found "
                            "none; for the Kaggle layout (train.csv + train_images/) use data.source=csv")
    elif not ((root / "train.csv").is_file() and (root / "train_images").is_dir()):
        raise DataError(f"data.root = {root}: the csv layout needs train.csv and train_images/ (Kaggle 2020); for "
                        "one sub-folder per class use data.source=folder")
    return root


def check_stage_inputs(stage: str) -> None:
    for relative, producer in STAGE_INPUTS.get(stage, ()):
        if not (workspace_root() / relative).exists():
            raise MissingInput(f"{stage}: {relative} is missing: run the {producer} stage first "
                               f"(dvc repro, or python -m tasks.cli {producer})")


def tracking_uri() -> str:
    """The store the stages will log to: MLFLOW_TRACKING_URI, else mlflow.db at the tracking root (as
    `tasks.tracking.configure_tracking` decides)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tracking_root() / 'mlflow.db'}"


def cap_mlflow_http_retries() -> None:
    for variable, value in MLFLOW_HTTP_LIMITS.items():
        os.environ.setdefault(variable, value)


def check_tracking_store(uri: str) -> None:
    """Raise TrackingStoreError unless the store at `uri` can be reached (and, for SQLite, written)."""
    label = f"MLFLOW_TRACKING_URI = {uri}" if os.environ.get("MLFLOW_TRACKING_URI") else f"tracking store {uri}"
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0].lower()
    if scheme in ("http", "https"):
        _probe_mlflow_server(uri, label)
    elif scheme == "sqlite":
        _check_sqlite_folder(uri, label)
    elif scheme in DATABASE_PORTS:
        _probe_database(uri, scheme, label)
    # Other stores (databricks, file paths) are MLflow's to judge.


def _probe_mlflow_server(uri: str, label: str) -> None:
    base = uri.rstrip("/")
    fix = "start the server, or unset MLFLOW_TRACKING_URI to log to mlflow.db in the repository"
    status = _http_status(f"{base}/health", label, fix)
    if status == 200:
        return
    # No /health (a proxy, or a path prefix): MLflow's REST API must answer (401/403: it does, behind auth).
    status = _http_status(f"{base}/api/2.0/mlflow/experiments/search?max_results=1", label, fix)
    if status not in (200, 401, 403):
        raise TrackingStoreError(f"{label}: the server answers HTTP {status}, not as an MLflow tracking server; {fix}")


def _http_status(url: str, label: str, fix: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_SECONDS) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise TrackingStoreError(f"{label}: no MLflow server answers ({reason}); {fix}") from None


def _check_sqlite_folder(uri: str, label: str) -> None:
    # sqlite:///relative/path or sqlite:////absolute/path (SQLAlchemy's rule: what follows the third slash).
    database = uri.split("://", 1)[1].removeprefix("/")
    if not database or database == ":memory:":
        return
    path = Path(urllib.parse.unquote(database.split("?", 1)[0]))
    folder = path.parent
    if not folder.is_dir():
        raise TrackingStoreError(f"{label}: folder {folder} does not exist; create it or point "
                                 "MLFLOW_TRACKING_URI at an existing store")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise TrackingStoreError(f"{label}: {path if path.exists() else folder} is not writable; fix its "
                                 "permissions or point MLFLOW_TRACKING_URI at a writable store")


def _probe_database(uri: str, scheme: str, label: str) -> None:
    parts = urllib.parse.urlsplit(uri)
    host, port = parts.hostname or "localhost", parts.port or DATABASE_PORTS[scheme]
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_SECONDS).close()
    except OSError as error:
        raise TrackingStoreError(f"{label}: the database at {host}:{port} does not answer ({error}); start it "
                                 "or point MLFLOW_TRACKING_URI at another store") from None


def preflight(params: Params, stage: str | None = None) -> None:
    """Every check an entry can make before anything slow. `stage` None: the whole pipeline (its data source);
    a stage: what that stage reads (acquire: the data source). The tracking store in both cases."""
    if stage in (None, "acquire"):
        check_data_source(params.data)
    if stage in (None, "train", "pretrain"):
        from tasks.backbones import check_imagenet_weights_available

        check_imagenet_weights_available(params.model)  # offline ImageNet weights: a second, not a failed download
    if stage is not None:
        check_stage_inputs(stage)
    cap_mlflow_http_retries()
    check_tracking_store(tracking_uri())


def check_command_line(argv: Sequence[str]) -> None:
    """Preflight of a pipeline command line (`-S key=value`, `--params FILE`), for an entry to call before
    it imports Prefect. Other arguments (and --help) are left to the entry's own parser."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--params", dest="params_file")
    parser.add_argument("--profile")
    known, _ = parser.parse_known_args(list(argv))
    if {"-h", "--help"} & set(argv):
        return
    preflight(load_params(known.params_file, known.overrides, known.profile))

