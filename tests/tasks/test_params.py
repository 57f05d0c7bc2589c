"""The one params schema: defaults, overrides, and one-line errors that name key, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

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
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ParamsError) as raised:
        load_params(code_root() / "params.yaml", [override])
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)


def test_flattening_rule_joins_keys_with_dots_and_writes_lists_as_yaml() -> None:
    flat = flatten_params(load_params(code_root() / "params.yaml"))
    assert flat["train.early_stopping.patience"] == "4"
    assert flat["model.conv_filters"] == "[16, 32, 64]"
    assert all(isinstance(value, str) for value in flat.values())


def test_cli_rejects_bad_params_with_exit_2_before_importing_tensorflow() -> None:
    probe = (
        "import sys\n"
        "from tasks.cli import main\n"
        "sys.argv = ['x', 'train', '-S', 'model.initializer=bogus']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n"
        "    print('TF', 'tensorflow' in sys.modules, 'MLFLOW', 'mlflow' in sys.modules)\n"
        "    raise\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=code_root(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "TF False MLFLOW False" in result.stdout
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1
    assert "model.initializer = 'bogus'" in error_lines[0] and "glorot_uniform" in error_lines[0]
