"""Sweeps, the pure core: parse a grid or random search over params keys, expand it into points, name it,
validate every point, and summarize the children's results. No MLflow, no TensorFlow, no Prefect.

A sweep spec comes from a YAML file, the command line, or both (the command line wins per key):

    method: grid                 # grid (every combination) | random (`budget` points drawn with `seed`)
    budget: 8                    # random only
    seed: 0
    metric: test_macro_f1        # what "best" means (higher is better); default: registry.metric
    parameters:
      train.learning_rate: [0.001, 0.01]                        # a list of values
      model.dropout: [0, 0.3]
      train.weight_decay: {distribution: loguniform, low: 1.0e-4, high: 1.0e-2}   # random only
    dask_address: null           # an existing Dask scheduler (else a local cluster); env CASSAVA_DASK_ADDRESS
    workers: null                # local cluster size (default: one per core, at most one per point)

On the command line a parameter is `section.key=v1,v2` (each value YAML, so `model.conv_filters=[8,16],[16,32]`
works), or `section.key=loguniform(1e-4,1e-2)` / `uniform(a,b)` / `randint(a,b)` for a random search. A key
with a single value is a fixed override for every point.
"""

from __future__ import annotations

import csv
import io
import math
import random
import re
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from tasks.errors import UserError
from tasks.params import ParamsError, apply_overrides, validate_params

DISTRIBUTIONS = ("uniform", "loguniform", "randint")
# Short names for the sweep's title; any other key is named by its last part.
SHORT_NAMES = {"learning_rate": "lr", "batch_size": "bs", "weight_decay": "wd", "conv_filters": "filters"}
SUMMARY_METRICS = ("test_accuracy", "test_macro_f1", "train.best_val_accuracy", "train.best_epoch")
_DISTRIBUTION_CALL = re.compile(r"^\s*(uniform|loguniform|randint)\s*\((.*)\)\s*$")


class SweepError(UserError, ValueError):
    """A sweep spec is invalid; the message is one line naming the key or point and what to do."""


@dataclass(frozen=True)
class Distribution:
    """A random-search range for one key."""

    kind: str  # uniform | loguniform | randint (both ends included)
    low: float
    high: float

    def sample(self, rng: random.Random) -> float | int:
        if self.kind == "randint":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "loguniform":
            return float(f"{math.exp(rng.uniform(math.log(self.low), math.log(self.high))):.4g}")
        return float(f"{rng.uniform(self.low, self.high):.4g}")


Axis = list[Any] | Distribution  # the values a key takes: a list (grid or random choice) or a range (random)


@dataclass
class SweepSpec:
    parameters: dict[str, Axis] = field(default_factory=dict)
    method: str = "grid"
    budget: int | None = None
    seed: int = 0
    metric: str | None = None
    dask_address: str | None = None
    workers: int | None = None

    def as_record(self) -> dict[str, Any]:
        """The spec as logged with the parent run (ranges written out)."""
        return {
            "method": self.method, "budget": self.budget, "seed": self.seed, "metric": self.metric,
            "parameters": {key: axis if isinstance(axis, list) else dict(distribution=axis.kind, low=axis.low,
                                                                         high=axis.high)
                           for key, axis in self.parameters.items()},
        }

    @property
    def swept_keys(self) -> list[str]:
        """Keys that take more than one value (the others are fixed overrides)."""
        return [key for key, axis in self.parameters.items() if isinstance(axis, Distribution) or len(axis) > 1]


def parse_axis(text: str) -> tuple[str, Axis]:
    """`section.key=v1,v2` → (key, [v1, v2]); `section.key=loguniform(a,b)` → (key, Distribution)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise SweepError(f"sweep parameter {text!r}: expected section.key=v1,v2 (or section.key=loguniform(a,b))")
    call = _DISTRIBUTION_CALL.match(raw)
    if call:
        return key, _distribution(key, {"distribution": call.group(1), **_bounds(key, call.group(2))})
    try:
        values = yaml.safe_load(f"[{raw}]")  # a YAML flow sequence: commas inside [..] stay with their list
    except yaml.YAMLError:
        raise SweepError(f"sweep parameter {text!r}: values are not valid YAML (quote strings with commas)") from None
    return key, list(values)


def _bounds(key: str, text: str) -> dict[str, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise SweepError(f"sweep parameter {key}: a range needs two numbers, e.g. loguniform(1e-4,1e-2)") from None
    return {"low": low, "high": high}


def _distribution(key: str, spec: Mapping[str, Any]) -> Distribution:
    kind = spec.get("distribution")
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"sweep parameter {key}: distribution {kind!r} is not one of {', '.join(DISTRIBUTIONS)}")
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise SweepError(f"sweep parameter {key}: a {kind} range needs numbers low and high") from None
    if not low < high or (kind == "loguniform" and low <= 0):
        raise SweepError(f"sweep parameter {key}: {kind}({low:g}, {high:g}) needs low < high"
                         + (" and low > 0" if kind == "loguniform" else ""))
    return Distribution(kind, low, high)


_SPEC_KEYS = ("method", "budget", "seed", "metric", "parameters", "dask_address", "workers")


def load_spec(path: str | Path | None, axes: Sequence[str] = (), random_budget: int | None = None,
              seed: int | None = None, metric: str | None = None) -> SweepSpec:
    """The sweep spec from a YAML file (optional) with command-line axes, `--random N`, `--seed`, `--metric` on top."""
    tree: dict[str, Any] = {}
    if path:
        tree = _read_spec_file(Path(path))
        unknown = sorted(set(tree) - set(_SPEC_KEYS))
        if unknown:
            raise SweepError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(_SPEC_KEYS)})")
    parameters: dict[str, Axis] = {}
    for key, raw in (tree.get("parameters") or {}).items():
        if isinstance(raw, Mapping):
            parameters[str(key)] = _distribution(str(key), raw)
        else:
            parameters[str(key)] = list(raw) if isinstance(raw, list) else [raw]
    for text in axes:
        key, axis = parse_axis(text)
        parameters[key] = axis
    spec = SweepSpec(
        parameters=parameters,
        method="random" if random_budget is not None else str(tree.get("method", "grid")),
        budget=random_budget if random_budget is not None else tree.get("budget"),
        seed=seed if seed is not None else int(tree.get("seed", 0)),
        metric=metric or tree.get("metric"),
        dask_address=tree.get("dask_address"),
        workers=tree.get("workers"),
    )
    check_spec(spec)
    return spec


def _read_spec_file(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise SweepError(f"sweep file not found: {file}")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise SweepError(f"{where}: not valid YAML: {getattr(error, 'problem', None) or error}") from None
    if not isinstance(tree, dict):
        raise SweepError(f"{file}: expected a mapping with `parameters:` (and method, budget, seed, metric)")
    return tree


def check_spec(spec: SweepSpec) -> None:
    if spec.method not in ("grid", "random"):
        raise SweepError(f"sweep method {spec.method!r}: use grid or random")
    if not spec.swept_keys:
        raise SweepError("nothing to sweep: give a key with two or more values, e.g. -S train.learning_rate=0.001,0.01")
    for key, axis in spec.parameters.items():
        if key.startswith("data.") and key in spec.swept_keys:
            # The data is prepared once and shared by every point (a fixed data.* override is fine).
            raise SweepError(f"sweep parameter {key}: data.* keys cannot be swept (the data is prepared once for "
                             "all points); run one sweep per data setting")
        if isinstance(axis, list) and not axis:
            raise SweepError(f"sweep parameter {key}: no values")
        if isinstance(axis, Distribution) and spec.method == "grid":
            raise SweepError(f"sweep parameter {key}: a {axis.kind} range needs a random search (--random N)")
    if spec.method == "random" and (not isinstance(spec.budget, int) or spec.budget < 1):
        raise SweepError(f"random search budget {spec.budget!r}: give a positive number of points (--random N)")
    if spec.workers is not None and (not isinstance(spec.workers, int) or spec.workers < 1):
        raise SweepError(f"sweep workers {spec.workers!r}: give a positive number")


def expand_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point of the sweep, in a stable order: each is {key: value} over every spec key."""
    keys = list(spec.parameters)
    if spec.method == "grid":
        return [dict(zip(keys, values)) for values in product(*(spec.parameters[key] for key in keys))]
    rng = random.Random(spec.seed)
    points: list[dict[str, Any]] = []
    seen: set[str] = set()
    # Draw without repeats where the space allows it (a small choice-only space may hold fewer points).
    for _ in range(spec.budget * 50):
        if len(points) == spec.budget:
            break
        point = {key: axis.sample(rng) if isinstance(axis, Distribution) else rng.choice(axis)
                 for key, axis in spec.parameters.items()}
        signature = yaml.safe_dump(point, sort_keys=True)
        if signature not in seen:
            seen.add(signature)
            points.append(point)
    return points


def point_overrides(point: Mapping[str, Any]) -> list[str]:
    """`section.key=value` overrides of one point, values written as YAML (what `load_params` parses back)."""
    return [f"{key}={_yaml_value(value)}" for key, value in point.items()]


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def validate_points(base_tree: Mapping[str, Any], base_overrides: Sequence[str],
                    points: Sequence[Mapping[str, Any]]) -> None:
    """Validate every point through the params schema before anything starts; SweepError names the point."""
    for number, point in enumerate(points, start=1):
        try:
            validate_params(apply_overrides(base_tree, [*base_overrides, *point_overrides(point)]))
        except ParamsError as error:
            raise SweepError(f"sweep point {number} ({describe_point(point)}): {error}") from None


def short_name(key: str, keys: Sequence[str]) -> str:
    """A short, unambiguous name of a swept key for titles: train.learning_rate → lr."""
    last = key.rsplit(".", 1)[-1]
    name = SHORT_NAMES.get(last, last)
    clashes = [other for other in keys if other != key and SHORT_NAMES.get(other.rsplit(".", 1)[-1],
                                                                            other.rsplit(".", 1)[-1]) == name]
    return key if clashes else name


def sweep_title(spec: SweepSpec, points: int) -> str:
    """The parent run's name: what was swept and how many points, e.g. `sweep lr×dropout (4)`."""
    keys = spec.swept_keys
    kind = "sweep" if spec.method == "grid" else "random sweep"
    return f"{kind} {'×'.join(short_name(key, keys) for key in keys)} ({points})"


def describe_point(point: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """`lr=0.001 dropout=0.3`: the point's values of `keys` (default: all of them)."""
    keys = list(keys) if keys is not None else list(point)
    return " ".join(f"{short_name(key, keys)}={_yaml_value(point[key])}" for key in keys)


@dataclass
class PointResult:
    """One child's outcome as the parent summarizes it."""

    number: int
    point: dict[str, Any]
    run_id: str | None
    status: str  # FINISHED | FAILED | KILLED | ...
    metrics: dict[str, float]
    duration_s: float | None = None


def best_result(results: Sequence[PointResult], metric: str) -> PointResult | None:
    """The finished child with the highest `metric` (the first on a tie); None when none has it."""
    candidates = [result for result in results
                  if result.status == "FINISHED" and math.isfinite(result.metrics.get(metric, float("nan")))]
    return max(candidates, key=lambda result: result.metrics[metric], default=None)


def summary_rows(results: Sequence[PointResult], keys: Sequence[str], metric: str) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: point, run id, status, every swept key, the sweep metric and the final metrics."""
    metric_columns = [metric, *(name for name in SUMMARY_METRICS if name != metric)]
    header = ["point", "run_id", "status", *keys, *metric_columns, "duration_s"]
    rows = [
        [result.number, result.run_id or "", result.status, *(_yaml_value(result.point[key]) for key in keys),
         *(result.metrics.get(name, "") for name in metric_columns),
         "" if result.duration_s is None else round(result.duration_s, 1)]
        for result in results
    ]
    return header, rows


def summary_csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def summary_markdown(header: Sequence[str], rows: Sequence[Sequence[Any]], best_number: int | None) -> str:
    """A markdown table; the best point's row is marked in bold."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [cell(value) for value in row]
        if row[0] == best_number:
            cells = [f"**{value}**" if value != "" else value for value in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
