"""Shared fixtures: a throw-away workspace (params.yaml + data + tracking store) on a tiny configuration."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from tasks.params import Params, apply_overrides, code_root, validate_params

# Small enough that a whole pipeline runs in seconds on 2 CPU cores, big enough to split and learn a little.
TINY_OVERRIDES = [
    "data.synthetic.images_per_class=16",
    "data.synthetic.render_size=48",
    "data.image_size=32",
    "data.min_images_per_class=6",
    "data.val_fraction=0.25",
    "data.test_fraction=0.25",
    "model.conv_filters=[8, 16]",
    "model.dense_units=16",
    "train.epochs=3",
    "train.batch_size=16",
    "evaluate.batch_size=32",
]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`reliability` and `server` tests are slow by definition, so `-m "not slow"` leaves them out."""
    for item in items:
        if item.get_closest_marker("reliability") or item.get_closest_marker("server"):
            item.add_marker(pytest.mark.slow)


def tiny_params_tree(extra: list[str] = ()) -> dict:
    tree = yaml.safe_load((code_root() / "params.yaml").read_text())
    return apply_overrides(tree, [*TINY_OVERRIDES, *extra])


@pytest.fixture
def tiny_params() -> Params:
    return validate_params(tiny_params_tree())


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty workspace with the tiny params.yaml; stages write data/, models/, reports/, mlflow.db there."""
    from tests.helpers import empty_store

    root = tmp_path / "workspace"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(), sort_keys=False))
    shutil.copyfile(empty_store(), root / "mlflow.db")
    monkeypatch.setenv("CASSAVA_WORKSPACE", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.chdir(root)
    return root
