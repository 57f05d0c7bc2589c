"""When the flow may skip a data stage: the rule `dvc repro` applies, read from the same `dvc.yaml`.

A data stage (acquire, prepare) is skipped, shown as Cached in Prefect, when its real inputs are what they were
the last time it ran in this workspace: the content hash of every `deps:` entry of its dvc.yaml stage (code
files and data folders, hashed as dvc.lock hashes them), the values of its `params:` keys, and for acquire from
a local data set (`data.root`), that folder's content, which DVC does not watch. The stage's outputs must
also still be what it left; `outputs_intact` checks them against what the cached result recorded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from tasks.params import Params, code_root, workspace_root

ABSENT = "absent"


@functools.cache
def stage_spec(stage: str) -> dict[str, Any]:
    """The stage's entry in dvc.yaml (deps, params, outs)."""
    return yaml.safe_load((code_root() / "dvc.yaml").read_text())["stages"][stage]


def content_hash(path: Path) -> str:
    """A folder's DVC hash (md5 of its .dir listing, as in dvc.lock), a file's md5, or "absent"."""
    if path.is_dir():
        from tasks.tracking import dvc_data_version

        return dvc_data_version(path) or ABSENT
    if path.is_file():
        digest = hashlib.md5()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return ABSENT


def stage_inputs(stage: str, params: Params) -> dict[str, str]:
    """Everything the stage reads, as hashes and values: equal inputs give equal outputs."""
    spec = stage_spec(stage)
    values = params.model_dump()
    inputs = {f"params:{key}": json.dumps(_lookup(values, key), sort_keys=True) for key in spec.get("params", [])}
    for dep in spec.get("deps", []):
        inputs[f"deps:{dep}"] = content_hash(_locate(dep))
    if stage == "acquire" and params.data.root:
        root = Path(params.data.root)
        inputs["data.root content"] = content_hash(root if root.is_absolute() else workspace_root() / root)
    return inputs


def output_hashes(stage: str) -> dict[str, str]:
    """The current content hash of every output the stage declares in dvc.yaml."""
    return {out: content_hash(workspace_root() / out) for out in map(_entry_path, stage_spec(stage).get("outs", []))}


def outputs_intact(stage: str, recorded: dict[str, str]) -> bool:
    """Whether the stage's outputs are still what it left (not deleted or edited since)."""
    return output_hashes(stage) == recorded


def stage_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: one key per (workspace, stage, inputs); the MLflow run id is not an input."""
    stage = parameters["stage"]
    payload = {"workspace": str(workspace_root()), "stage": stage, "inputs": stage_inputs(stage, parameters["params"])}
    return f"cassava-{stage}-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _lookup(values: dict[str, Any], dotted_key: str) -> Any:
    for part in dotted_key.split("."):
        values = values[part]
    return values


def _locate(dep: str) -> Path:
    """A data dependency lives in the workspace, a code dependency (tasks/*.py) in the checkout."""
    in_workspace = workspace_root() / dep
    return in_workspace if in_workspace.exists() or not (code_root() / dep).exists() else code_root() / dep


def _entry_path(entry: str | dict[str, Any]) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))
