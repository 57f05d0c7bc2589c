"""The one params schema: defaults, overrides, and one-line errors that name key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.params import ParamsError, code_root, flatten_params, load_params, parse_override


def test_committed_params_file_is_valid() -> None:
    params = load_params(code_root() / "params.yaml")
    assert params.data.source == "synthetic"
    assert params.model.initializer == "glorot_uniform"


def test_overrides_are_typed_like_dvc_exp_run_set() -> None:
    params = load_params(
        code_root() / "params.yaml",
        ["train.learning_rate=0.01", "model.conv_filters=[8, 16]", "model.batch_norm=false", "data.root=some/dir"],
    )
    assert params.train.learning_rate == 0.01
    assert params.model.conv_filters == [8, 16]
    assert params.model.batch_norm is False
    assert params.data.root == "some/dir"
    assert parse_override("train.early_stopping.patience=7") == (["train", "early_stopping", "patience"], 7)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=0.1", "train.lr: unknown key (allowed: epochs, batch_size, optimizer, learning_rate"),
        ("model.initializer=bogus", "model.initializer = 'bogus': input should be 'glorot_uniform'"),
        ("train.learning_rate=-1", "train.learning_rate = -1: input should be greater than 0"),
        ("train.epochs=many", "train.epochs = 'many'"),
        ("data.source=folder", "data.root is required when data.source = 'folder'"),
        ("data.test_fraction=0.8", "data.val_fraction + data.test_fraction = 0.95: must be < 0.9"),
        ("train", "override 'train': expected section.key=value"),
        ("data.seed=-1", "data.seed = -1: input should be greater than or equal to 0"),
        ("train.seed=-7", "train.seed = -7: input should be greater than or equal to 0"),
        ("train.jit_compile=maybe", "train.jit_compile = 'maybe': input should be a valid boolean"),
        ("train.jit_compile=true", "train.jit_compile = true needs train.deterministic = false"),
        ("evaluate.seed=4294967296", "evaluate.seed = 4294967296: input should be less than 4294967296"),
        ("registry.metric=test_loss", "registry.metric = 'test_loss': not a metric the evaluation scores; use one of "
                                      "test_accuracy, test_macro_f1, test_top2_accuracy or test_precision/test_recall"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ParamsError) as raised:
        load_params(code_root() / "params.yaml", [override])
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_gate_metric_may_be_any_score_the_evaluation_computes() -> None:
    params_file = code_root() / "params.yaml"
    assert load_params(params_file, ["registry.metric=test_f1.cbb"]).registry.metric == "test_f1.cbb"
    assert load_params(params_file, ["evaluate.top_k=3", "registry.metric=test_top3_accuracy"]).evaluate.top_k == 3
    with pytest.raises(ParamsError, match="registry.metric = 'test_top3_accuracy'.*test_top2_accuracy"):
        load_params(params_file, ["registry.metric=test_top3_accuracy"])


@pytest.mark.parametrize("content", ["", "# all commented out\n", "{}\n"])
def test_an_empty_params_file_is_an_error_not_silent_defaults(tmp_path: Path, content: str) -> None:
    (tmp_path / "params.yaml").write_text(content)
    with pytest.raises(ParamsError, match=r"params.yaml is empty: it must hold the sections data, model, train"):
        load_params(tmp_path / "params.yaml")


def test_invalid_yaml_is_one_line_with_file_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  seed: 1\ntrain:\n  epochs: [3\n  batch_size: 8\n")
    with pytest.raises(ParamsError) as raised:
        load_params(tmp_path / "params.yaml")
    assert str(raised.value).startswith(f"{tmp_path / 'params.yaml'}:5:13: not valid YAML: ")
    assert "\n" not in str(raised.value)


def test_flattening_rule_joins_keys_with_dots_and_writes_lists_as_yaml() -> None:
    flat = flatten_params(load_params(code_root() / "params.yaml"))
    assert flat["train.early_stopping.patience"] == "4"
    assert flat["model.conv_filters"] == "[16, 32, 64]"
    assert flat["model.batch_norm"] == "True" and flat["data.root"] == "None" and flat["train.learning_rate"] == "0.002"
    assert flat["data.synthetic.images_per_class"] == "200"  # a nested section: every level joined
    assert "train.early_stopping" not in flat and "data.synthetic" not in flat  # sections are not values


def run_entry_and_list_heavy_modules(module: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m <module> <arguments>` in a subprocess that prints, on exit, which of TensorFlow, MLflow
    and Prefect it had imported (by sys.modules, not by timing)."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['{module}', *{list(arguments)!r}]\n"
        "try:\n"
        f"    runpy.run_module('{module}', run_name='__main__', alter_sys=True)\n"
        "finally:\n"
        "    print('HEAVY', sorted(name for name in ('tensorflow', 'keras', 'mlflow', 'prefect') if name in sys.modules))\n"
    )
    return subprocess.run([sys.executable, "-c", probe], cwd=code_root(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("arguments", "returncode", "expected"),
    [
        (["--help"], 0, "check-params"),
        (["check-params", "-S", "train.epochs=30"], 0, "train.epochs = 30"),
        (["train", "-S", "model.initializer=bogus"], 2, "error: invalid params: model.initializer = 'bogus': input "
                                                        "should be 'glorot_uniform'"),
    ],
)
def test_cli_help_check_and_rejection_import_no_heavy_library(arguments: list[str], returncode: int,
                                                              expected: str) -> None:
    result = run_entry_and_list_heavy_modules("tasks.cli", *arguments)
    assert result.returncode == returncode, result.stderr
    assert "HEAVY []" in result.stdout
    assert expected in result.stdout + result.stderr
    if returncode:
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
