"""Source-task pretraining, offline: train a model on a source data set and record it in MLflow, so a target
run can start from its backbone (`model.backbone_weights=runs:/<run id>/model`).

The source run is the ordinary pipeline (acquire → prepare → train) with `pretrain.overrides` applied on top of
the params, run in a workspace folder of its own (`pretrain/`: its own data/ and models/, so the target's
prepared data and model are untouched) and logged into this project's tracking store. `models/pretrained.json`
names the run and the model URI to start from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import yaml

from tasks.params import Params, ParamsError, apply_overrides, validate_params, workspace_root

log = logging.getLogger(__name__)
SOURCE_WORKSPACE = Path("pretrain")
PRETRAINED_FILE = Path("models/pretrained.json")
SOURCE_STAGES = ("acquire", "prepare", "train")  # the source run: no evaluation, no registry


def source_params(params: Params) -> Params:
    """The source run's params: these params with `pretrain.overrides` on top (checked as every params are)."""
    tree = apply_overrides(params.model_dump(), params.pretrain.overrides)
    root = tree["data"].get("root")
    if root and not Path(root).is_absolute():  # relative to the project, not to the source workspace
        tree["data"]["root"] = str(workspace_root() / root)
    try:
        return validate_params(tree)
    except ParamsError as error:
        raise ParamsError(f"pretrain.overrides: {error}") from None


@contextlib.contextmanager
def source_workspace(params: Params) -> Iterator[Params]:
    """Inside: the workspace is `pretrain/` (with the source params as its params.yaml) and runs go to the
    project's tracking store. Yields the source params."""
    from tasks.tracking import configure_tracking

    project = workspace_root()
    tracking_uri = configure_tracking()  # the project's store, resolved before the workspace moves
    folder = project / SOURCE_WORKSPACE
    folder.mkdir(parents=True, exist_ok=True)
    source = source_params(params)
    (folder / "params.yaml").write_text(yaml.safe_dump(source.model_dump(), sort_keys=False))
    saved = {name: os.environ.get(name) for name in ("CASSAVA_WORKSPACE", "MLFLOW_TRACKING_URI")}
    os.environ.update({"CASSAVA_WORKSPACE": str(folder), "MLFLOW_TRACKING_URI": tracking_uri})
    try:
        yield source
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def record_pretrained(run_id: str, source: Params) -> dict[str, str]:
    """Write models/pretrained.json: the run, the model URI a target run starts from, how it was made."""
    record = {
        "run_id": run_id,
        "model_uri": f"runs:/{run_id}/model",
        "backbone": source.model.backbone,
        "use_with": f"-S model.backbone={source.model.backbone} -S model.backbone_weights=runs:/{run_id}/model",
        "overrides": ", ".join(source.pretrain.overrides),
    }
    file = workspace_root() / PRETRAINED_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(record, indent=2) + "\n")
    log.info("pretrain: source run %s; start a target run with %s", run_id, record["use_with"])
    return record


def run_pretrain(params: Params, run_id: str | None = None) -> str:
    """Stage entry (DVC command): the source pipeline in its own workspace, one MLflow run, then
    models/pretrained.json."""
    from tasks.data import run_acquire, run_prepare
    from tasks.train import run_train

    with source_workspace(params) as source:
        for stage_entry in (run_acquire, run_prepare, run_train):
            run_id = stage_entry(source, run_id)
    record_pretrained(run_id, source)
    return run_id
