"""When the flow may skip a data stage: the same inputs as `dvc repro` (dvc.yaml's deps and params), hashed."""

from __future__ import annotations

from pathlib import Path

from flows.stage_cache import outputs_intact, output_hashes, stage_cache_key, stage_inputs
from tasks.params import Params, validate_params
from tests.conftest import tiny_params_tree


def _params(*overrides: str) -> Params:
    return validate_params(tiny_params_tree(list(overrides)))


def _key(stage: str, params: Params) -> str:
    return stage_cache_key(None, {"stage": stage, "params": params, "run_id": "any"})


def _raw_files(workspace: Path) -> Path:
    image = workspace / "data" / "raw" / "cmd" / "a.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"first")
    return image


def test_prepare_key_follows_raw_content_and_its_own_params_only(workspace: Path) -> None:
    image = _raw_files(workspace)
    params = _params()
    key = _key("prepare", params)

    assert _key("prepare", params) == key  # deterministic
    assert _key("prepare", _params("train.epochs=7", "model.dense_units=8")) == key  # not prepare's params
    assert _key("prepare", _params("data.image_size=40")) != key  # a param prepare reads
    image.write_bytes(b"second")  # same file name, new content
    assert _key("prepare", params) != key
    assert stage_inputs("prepare", params)["deps:data/raw"].endswith(".dir")  # DVC's folder hash, as dvc.lock


def test_acquire_key_follows_a_local_data_root(workspace: Path) -> None:
    source = workspace / "photos" / "healthy"
    source.mkdir(parents=True)
    (source / "leaf.jpg").write_bytes(b"one")
    params = _params("data.source=folder", "data.root=photos")
    key = _key("acquire", params)
    (source / "leaf2.jpg").write_bytes(b"two")  # a photo added: DVC does not see it, the flow does
    assert _key("acquire", params) != key
    assert _key("acquire", _params()) != _key("acquire", _params("data.synthetic.blur_fraction=0.5"))


def test_keys_differ_between_workspaces(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    _raw_files(workspace)
    key = _key("prepare", _params())
    other = tmp_path / "other"
    (other / "data" / "raw" / "cmd").mkdir(parents=True)
    (other / "data" / "raw" / "cmd" / "a.png").write_bytes(b"first")
    monkeypatch.setenv("CASSAVA_WORKSPACE", str(other))
    assert _key("prepare", _params()) != key  # a cached result is only reused where its outputs are


def test_outputs_intact_notices_deleted_or_edited_outputs(workspace: Path) -> None:
    image = _raw_files(workspace)
    (workspace / "data" / "acquire.mlflow.json").write_text("{}")
    recorded = output_hashes("acquire")
    assert set(recorded) == {"data/raw", "data/acquire.mlflow.json"}
    assert outputs_intact("acquire", recorded)
    image.write_bytes(b"edited by hand")
    assert not outputs_intact("acquire", recorded)
    image.unlink()
    image.parent.rmdir()
    (workspace / "data" / "raw").rmdir()
    assert output_hashes("acquire")["data/raw"] == "absent"
