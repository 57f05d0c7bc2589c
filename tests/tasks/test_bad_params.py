"""The bad-params generator: every leaf of params.yaml, mutated every way the schema forbids (wrong type, out of
range where a range exists, unknown key, bad choice), is rejected with its key named, in one line, fast."""

from __future__ import annotations

import subprocess
import sys
import time
import types
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import annotated_types
import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tasks.params import Params, ParamsError, code_root, load_params

pytestmark = pytest.mark.reliability

PARAMS_TREE = yaml.safe_load((code_root() / "params.yaml").read_text())


@dataclass(frozen=True)
class Mutation:
    kind: str  # wrong type, out of range, unknown key, bad choice
    key: str  # the dotted key the error must name
    path: tuple[str, ...]  # where to write in the tree
    value: Any
    remove: tuple[str, ...] | None = None  # a key to take out (a typo replaces its key)

    def apply(self, tree: dict[str, Any]) -> dict[str, Any]:
        tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
        if self.remove:
            _parent(tree, self.remove).pop(self.remove[-1])
        _parent(tree, self.path)[self.path[-1]] = self.value
        return tree


def _parent(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for part in path[:-1]:
        tree = tree[part]
    return tree


def _members(annotation: Any) -> list[Any]:
    """The alternatives of a union (or the annotation itself), with Annotated metadata kept."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _split(member: Any) -> tuple[Any, list[Any]]:
    """(bare type, constraints) of a possibly Annotated type."""
    if typing.get_origin(member) is typing.Annotated:
        bare, *extras = typing.get_args(member)
        constraints = [item for extra in extras
                       for item in (extra.metadata if isinstance(extra, FieldInfo) else [extra])]
        return bare, constraints
    return member, []


def _out_of_range(constraints: list[Any]) -> Iterator[Any]:
    for constraint in constraints:
        if isinstance(constraint, annotated_types.Ge):
            yield constraint.ge - 1
        elif isinstance(constraint, annotated_types.Gt):
            yield constraint.gt
        elif isinstance(constraint, annotated_types.Le):
            yield constraint.le + 1
        elif isinstance(constraint, annotated_types.Lt):
            yield constraint.lt


def leaf_mutations(path: tuple[str, ...], field: FieldInfo) -> Iterator[Mutation]:
    key = ".".join(path)
    members = [_split(member) for member in _members(field.annotation)]
    bares = [bare for bare, _ in members]
    origins = {typing.get_origin(bare) or bare for bare in bares}
    choices = [choice for bare in bares if typing.get_origin(bare) is typing.Literal
               for choice in typing.get_args(bare)]

    if str not in origins and not choices:
        yield Mutation("wrong type", key, path, "not-a-valid-value")
    if dict not in origins:
        yield Mutation("wrong type", key, path, {"unexpected": "mapping"})
    if choices:
        yield Mutation("bad choice", key, path, "bogus-choice")

    scalar_constraints = list(field.metadata) if typing.get_origin(field.annotation) is not list else []
    for bare, constraints in members:
        if typing.get_origin(bare) is list:
            continue
        for value in _out_of_range(scalar_constraints + constraints):
            yield Mutation("out of range", key, path, value)
    for bare in bares:
        if typing.get_origin(bare) is not list:
            continue
        item_bare, item_constraints = _split(typing.get_args(bare)[0])
        for value in _out_of_range(item_constraints):
            yield Mutation("out of range", key, path, [value])
        for constraint in field.metadata:
            if isinstance(constraint, annotated_types.MinLen) and constraint.min_length > 0:
                yield Mutation("out of range", key, path, [])
            if isinstance(constraint, annotated_types.MaxLen):
                yield Mutation("out of range", key, path, [1] * (constraint.max_length + 1))

    typo = path[:-1] + (path[-1] + "_typo",)
    yield Mutation("unknown key", ".".join(typo), typo, _committed_value(path), remove=path)


def _committed_value(path: tuple[str, ...]) -> Any:
    node: Any = PARAMS_TREE
    for part in path:
        node = node[part]
    return node


def generate(tree: dict[str, Any] = PARAMS_TREE, model: type[BaseModel] = Params,
             prefix: tuple[str, ...] = ()) -> Iterator[Mutation]:
    """Mutations of every leaf of `tree` (the committed params.yaml), by the schema of each leaf."""
    for name, value in tree.items():
        field = model.model_fields[name]
        path = prefix + (name,)
        if isinstance(value, dict) and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from generate(value, field.annotation, path)
        else:
            yield from leaf_mutations(path, field)


# Rules the schema's types cannot show a generator: seeds NumPy and TensorFlow accept, and a gate metric that the
# evaluation scores (checked by a validator, so it is a plain str to the walk above).
KNOWN_RULES = [
    Mutation("out of range", "data.seed", ("data", "seed"), -1),
    Mutation("out of range", "train.seed", ("train", "seed"), -1),
    Mutation("out of range", "evaluate.seed", ("evaluate", "seed"), 2**32),
    Mutation("bad choice", "registry.metric", ("registry", "metric"), "test_loss"),
]
MUTATIONS = list(generate()) + KNOWN_RULES


def _write(tmp_path: Path, mutation: Mutation, index: int) -> Path:
    params_file = tmp_path / f"params-{index}.yaml"
    params_file.write_text(yaml.safe_dump(mutation.apply(PARAMS_TREE), sort_keys=False))
    return params_file


def test_every_leaf_mutation_is_rejected_by_name_in_one_line(tmp_path: Path) -> None:
    leaves = {mutation.path if not mutation.remove else mutation.remove for mutation in MUTATIONS}
    assert len(leaves) == len(list(_leaves(PARAMS_TREE))) >= 60  # every leaf of params.yaml got mutations
    rejected, slowest, total = Counter(), 0.0, time.perf_counter()
    missed = []
    for index, mutation in enumerate(MUTATIONS):
        params_file = _write(tmp_path, mutation, index)
        started = time.perf_counter()
        try:
            load_params(params_file)
        except ParamsError as error:
            message = str(error)
            if mutation.key in message and "\n" not in message:
                rejected[mutation.kind] += 1
            else:
                missed.append(f"{mutation}: {message}")
        else:
            missed.append(f"{mutation}: accepted")
        slowest = max(slowest, time.perf_counter() - started)
    generated = Counter(mutation.kind for mutation in MUTATIONS)
    print(f"\nbad params: {len(MUTATIONS)} generated, {sum(rejected.values())} rejected by name "
          f"({dict(generated)}); slowest rejection {slowest * 1000:.0f} ms, all {time.perf_counter() - total:.2f} s")
    assert missed == []
    assert rejected == generated
    assert slowest < 2.0


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, value in tree.items():
        if isinstance(value, dict) and name != "images_per_class":
            yield from _leaves(value, prefix + (name,))
        else:
            yield prefix + (name,)


@pytest.mark.parametrize("kind", ["wrong type", "out of range", "unknown key", "bad choice"])
def test_the_command_line_rejects_each_kind_in_one_line_with_exit_2(tmp_path: Path, kind: str) -> None:
    index, mutation = next((index, item) for index, item in enumerate(MUTATIONS) if item.kind == kind)
    params_file = _write(tmp_path, mutation, index)
    command = [sys.executable, "-m", "tasks.cli", "check-params", "--params", str(params_file)]
    started = time.monotonic()
    result = subprocess.run(command, cwd=code_root(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: invalid params: ") and result.stderr.count("\n") == 1
    assert mutation.key in result.stderr
    assert time.monotonic() - started < 10  # a whole interpreter start; the rejection itself is milliseconds
