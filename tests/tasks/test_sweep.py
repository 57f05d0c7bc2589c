"""The sweep's pure core: specs from the command line and YAML, grid and random expansion, validation of every
point through the params schema, names, and the summary table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml

from tasks.params import load_params
from tasks.sweep import (
    Distribution,
    PointResult,
    SweepError,
    best_result,
    describe_point,
    expand_points,
    load_spec,
    parse_axis,
    point_overrides,
    summary_csv,
    summary_markdown,
    summary_rows,
    sweep_title,
    validate_points,
)
from tests.conftest import tiny_params_tree


def test_axis_values_are_yaml_and_lists_keep_their_commas() -> None:
    assert parse_axis("train.learning_rate=0.001,0.01") == ("train.learning_rate", [0.001, 0.01])
    assert parse_axis("model.conv_filters=[8, 16],[16,32]") == ("model.conv_filters", [[8, 16], [16, 32]])
    assert parse_axis("train.optimizer=adam,sgd") == ("train.optimizer", ["adam", "sgd"])
    assert parse_axis("model.batch_norm=true,false") == ("model.batch_norm", [True, False])
    assert parse_axis("train.learning_rate=loguniform(1e-4, 1e-2)") == (
        "train.learning_rate", Distribution("loguniform", 1e-4, 1e-2))


@pytest.mark.parametrize("text, message", [
    ("train.learning_rate", "expected section.key=v1,v2"),
    ("train.learning_rate=", "expected section.key=v1,v2"),
    ("train.learning_rate=loguniform(0,1)", "low > 0"),
    ("train.learning_rate=uniform(1)", "two numbers"),
])
def test_bad_axes_name_the_parameter(text: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        parse_axis(text)


def test_grid_is_every_combination_in_order_and_overrides_round_trip(tiny_params) -> None:
    spec = load_spec(None, ["train.learning_rate=0.001,0.01", "model.dropout=0,0.3", "train.epochs=2"])
    points = expand_points(spec)
    assert spec.swept_keys == ["train.learning_rate", "model.dropout"]  # one value: a fixed override
    assert [(point["train.learning_rate"], point["model.dropout"]) for point in points] == [
        (0.001, 0), (0.001, 0.3), (0.01, 0), (0.01, 0.3)]
    assert all(point["train.epochs"] == 2 for point in points)
    assert load_spec(None, ["data.image_size=16", "model.dropout=0,0.3"]).swept_keys == ["model.dropout"]
    assert sweep_title(spec, len(points)) == "sweep lr×dropout (4)"
    assert describe_point(points[1], spec.swept_keys) == "lr=0.001 dropout=0.3"
    params = load_params(None, point_overrides({"model.conv_filters": [8, 16], "train.learning_rate": 0.01}))
    assert params.model.conv_filters == [8, 16] and params.train.learning_rate == 0.01


def test_random_search_draws_budget_distinct_points_reproducibly() -> None:
    axes = ["train.learning_rate=loguniform(1e-4,1e-2)", "train.optimizer=adam,sgd,rmsprop"]
    first = expand_points(load_spec(None, axes, random_budget=6, seed=3))
    again = expand_points(load_spec(None, axes, random_budget=6, seed=3))
    other = expand_points(load_spec(None, axes, random_budget=6, seed=4))
    assert first == again != other
    assert len(first) == 6 and len({yaml.safe_dump(point) for point in first}) == 6
    assert all(1e-4 <= point["train.learning_rate"] <= 1e-2 for point in first)
    assert {point["train.optimizer"] for point in first} <= {"adam", "sgd", "rmsprop"}
    # A space smaller than the budget yields every distinct point once.
    assert len(expand_points(load_spec(None, ["model.dropout=0,0.3"], random_budget=5))) == 2


def test_spec_file_with_command_line_on_top(tmp_path: Path) -> None:
    spec_file = tmp_path / "sweep.yaml"
    spec_file.write_text(yaml.safe_dump({
        "method": "random", "budget": 3, "seed": 7, "metric": "test_accuracy", "workers": 2,
        "parameters": {"train.learning_rate": {"distribution": "uniform", "low": 0.001, "high": 0.01},
                       "model.dropout": [0.0, 0.2]},
    }, sort_keys=False))
    spec = load_spec(spec_file, ["model.dropout=0.1,0.4"])
    assert (spec.method, spec.budget, spec.seed, spec.metric, spec.workers) == ("random", 3, 7, "test_accuracy", 2)
    assert spec.parameters["model.dropout"] == [0.1, 0.4]
    assert sweep_title(spec, 3) == "random sweep lr×dropout (3)"
    logged = tmp_path / "logged.yaml"  # the spec as the parent run logs it reads back as the same spec
    logged.write_text(yaml.safe_dump(spec.as_record(), sort_keys=False))
    assert expand_points(load_spec(logged)) == expand_points(spec)


@pytest.mark.parametrize("axes, random_budget, message", [
    (["train.learning_rate=0.01"], None, "nothing to sweep"),
    (["data.seed=1,2"], None, "data.* keys cannot be swept"),
    (["train.learning_rate=loguniform(1e-4,1e-2)"], None, "needs a random search"),
    (["train.learning_rate=0.1,0.2"], 0, "budget"),
])
def test_bad_specs_are_one_line(axes: list[str], random_budget: int | None, message: str) -> None:
    with pytest.raises(SweepError, match=message) as error:
        load_spec(None, axes, random_budget=random_budget)
    assert "\n" not in str(error.value)


def test_spec_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(SweepError, match="sweep file not found"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: {}\nbudgt: 3\n")
    with pytest.raises(SweepError, match="unknown key 'budgt'"):
        load_spec(bad)


def test_every_point_is_validated_and_the_bad_one_named() -> None:
    points = expand_points(load_spec(None, ["train.learning_rate=0.01,-1", "model.initializer=he_normal,bogus"]))
    with pytest.raises(SweepError) as error:
        validate_points(tiny_params_tree(), [], points)
    assert str(error.value).startswith("sweep point 2 (lr=0.01 initializer=bogus): invalid params: model.initializer")
    with pytest.raises(SweepError, match=r"sweep point 1 \(bogus=1\): .*train.bogus: unknown key"):
        validate_points(tiny_params_tree(), [], expand_points(load_spec(None, ["train.bogus=1,2"])))


def _results() -> list[PointResult]:
    return [
        PointResult(1, {"train.learning_rate": 0.001}, "a", "FINISHED", {"test_macro_f1": 0.5, "test_accuracy": 0.6}, 10.0),
        PointResult(2, {"train.learning_rate": 0.01}, "b", "FINISHED", {"test_macro_f1": 0.7, "test_accuracy": 0.65}, 12.0),
        PointResult(3, {"train.learning_rate": 0.1}, "c", "FAILED", {}, 3.0),
        PointResult(4, {"train.learning_rate": 1.0}, "d", "FINISHED", {"test_macro_f1": 0.7}, 11.0),
    ]


def test_best_is_the_highest_finished_metric_first_on_a_tie() -> None:
    results = _results()
    assert best_result(results, "test_macro_f1").run_id == "b"
    assert best_result(results, "test_accuracy").run_id == "b"
    assert best_result(results[2:3], "test_macro_f1") is None


def test_summary_table_has_a_row_per_point() -> None:
    header, rows = summary_rows(_results(), ["train.learning_rate"], "test_macro_f1")
    parsed = list(csv.DictReader(io.StringIO(summary_csv(header, rows))))
    assert [row["train.learning_rate"] for row in parsed] == ["0.001", "0.01", "0.1", "1.0"]
    assert [row["test_macro_f1"] for row in parsed] == ["0.5", "0.7", "", "0.7"]
    assert [row["status"] for row in parsed] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    markdown = summary_markdown(header, rows, best_number=2).splitlines()
    assert len(markdown) == 2 + 4 and markdown[3].startswith("| **2** | **b** |")
