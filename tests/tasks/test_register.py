"""The registry gate against a real SQLite MLflow store, with tiny real Keras models whose answers are known.

Two hand-weighted models stand in for trained ones: the "oracle" reads the class off the image's grey level
(always right on `grey_test_split()`, at any image size), the "constant" always answers the first class (macro
F1 1/6 there). The gate returns its decision; the register stage logs `GateResult.tags()` into the run (that
path is tested end to end in tests/tasks/test_evaluate.py and tests/test_dvc_pipeline.py).
"""

from __future__ import annotations

import math
from typing import Iterator

import pytest
from mlflow import MlflowClient

from tasks.names import (
    CHAMPION_ALIAS,
    CLASSES_TAG,
    DATA_VERSION_TAG,
    GATE_CHAMPION_METRIC_TAG,
    GATE_DECISION_TAG,
    GATE_REASON_TAG,
    metric_tag,
)
from tasks.register import GateDecision, GateResult, decide, gate_and_register
from tests.helpers import (
    CLASS_NAMES,
    IMAGE_SIZE,
    METRIC,
    constant_model,
    grey_test_split,
    log_model_run,
    module_workspace,
    oracle_model,
    save_model_dir,
)


# ---- the pure rule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidate", "champion", "expected", "reason"),
    [
        (0.5, None, True, "test_macro_f1 0.5000 reaches the minimum 0.3000; no champion yet"),
        (0.6, 0.5, True, "test_macro_f1 0.6000 beats the champion's 0.5000"),
        (0.4, 0.5, False, "test_macro_f1 0.4000 does not beat the champion's 0.5000"),
        (0.5, 0.5, False, "test_macro_f1 0.5000 does not beat the champion's 0.5000"),  # a tie keeps the champion
        (0.2, None, False, "test_macro_f1 0.2000 is below the minimum 0.3000"),
        (0.2, 0.1, False, "test_macro_f1 0.2000 is below the minimum 0.3000"),
        (math.nan, None, False, "test_macro_f1 is nan: not a number"),
    ],
)
def test_decide(candidate: float, champion: float | None, expected: bool, reason: str) -> None:
    assert decide(candidate, champion, 0.3, METRIC) == GateDecision(expected, reason)


# ---- the gate against a real registry ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Run ids of three evaluated runs; each test registers under its own model name."""
    root = tmp_path_factory.mktemp("registry")
    with module_workspace(root) as experiment_id:
        constant_dir = save_model_dir(constant_model(), root / "constant")
        oracle_dir = save_model_dir(oracle_model(), root / "oracle")
        yield {
            "constant": log_model_run(constant_dir, experiment_id, 0.8, "v1"),  # v1: a split where it looked good
            "oracle": log_model_run(oracle_dir, experiment_id, 0.9, "v1"),
            "oracle_v2": log_model_run(oracle_dir, experiment_id, 0.7, "v2"),
            # v3: the same images prepared at 16x16; the models trained on it take 16x16 inputs
            "oracle_16px": log_model_run(save_model_dir(oracle_model(16), root / "oracle16"), experiment_id, 0.7, "v3"),
            "constant_16px": log_model_run(save_model_dir(constant_model(16), root / "constant16"), experiment_id,
                                           0.5, "v3"),
        }


def _gate(run_id: str, model_name: str, minimum: float = 0.3, image_size: int = IMAGE_SIZE):
    images, labels = grey_test_split(image_size)
    return gate_and_register(run_id, model_name, METRIC, minimum, images, labels, CLASS_NAMES, batch_size=4)


def _champion_version(model_name: str) -> int:
    return int(MlflowClient().get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)


def _gate_tags(result: GateResult) -> tuple[str, str]:
    tags = result.tags()
    return tags[GATE_DECISION_TAG], tags[GATE_REASON_TAG]


@pytest.mark.slow
def test_first_model_is_registered_and_becomes_champion(runs: dict[str, str]) -> None:
    result = _gate(runs["constant"], "first")
    assert result.decision.register and result.registered_version == 1 and result.champion_version is None
    assert _champion_version("first") == 1
    version = MlflowClient().get_model_version("first", "1")
    assert version.run_id == runs["constant"]
    assert version.tags[DATA_VERSION_TAG] == "v1"
    assert float(version.tags[metric_tag(METRIC)]) == pytest.approx(0.8)
    assert version.tags[CLASSES_TAG] == "cbb,cmd,healthy"
    assert _gate_tags(result) == (
        "registered", "test_macro_f1 0.8000 reaches the minimum 0.3000; no champion yet"
    )


@pytest.mark.slow
def test_better_model_is_registered_and_takes_the_alias(runs: dict[str, str]) -> None:
    _gate(runs["constant"], "better")
    result = _gate(runs["oracle"], "better")
    assert result.decision.register and result.registered_version == 2 and result.champion_version == 1
    assert _champion_version("better") == 2
    decision, reason = _gate_tags(result)
    assert decision == "registered"
    assert reason == "test_macro_f1 0.9000 beats the champion's 0.8000 (champion: version 1)"


@pytest.mark.slow
def test_worse_model_is_rejected_and_the_alias_stays(runs: dict[str, str]) -> None:
    _gate(runs["oracle"], "worse")
    result = _gate(runs["constant"], "worse")
    assert not result.decision.register and result.registered_version is None
    assert _champion_version("worse") == 1
    assert [version.version for version in MlflowClient().search_model_versions("name = 'worse'")] == [1]
    decision, reason = _gate_tags(result)
    assert decision == "rejected"
    assert reason == "test_macro_f1 0.8000 does not beat the champion's 0.9000 (champion: version 1)"


@pytest.mark.slow
def test_model_below_the_minimum_is_rejected_and_not_registered(runs: dict[str, str]) -> None:
    result = _gate(runs["oracle"], "strict", minimum=0.95)
    assert not result.decision.register
    assert _gate_tags(result) == ("rejected", "test_macro_f1 0.9000 is below the minimum 0.9500")
    assert MlflowClient().search_registered_models("name = 'strict'") == []


@pytest.mark.slow
def test_champion_of_another_data_version_is_rescored_on_the_candidates_split(runs: dict[str, str]) -> None:
    _gate(runs["constant"], "rescored")  # 0.8 on v1; on the v2 split it always answers cbb: macro F1 1/6
    result = _gate(runs["oracle_v2"], "rescored")  # 0.7 < 0.8 recorded, but > 1/6 on the same split
    assert result.decision.register and _champion_version("rescored") == 2
    assert result.champion_metric == pytest.approx(1 / 6)
    decision, reason = _gate_tags(result)
    assert decision == "registered"
    assert reason == ("test_macro_f1 0.7000 beats the champion's 0.1667 (champion: version 1, re-scored on data "
                      "version v2 at its 8x8 input; it was evaluated on v1)")
    assert result.tags()[GATE_CHAMPION_METRIC_TAG].startswith("0.1666")


@pytest.mark.slow
def test_a_better_model_at_a_new_image_size_beats_the_champion_scored_at_its_own_size(runs: dict[str, str]) -> None:
    _gate(runs["constant"], "resized")  # 8x8 inputs, 0.8 recorded on v1
    result = _gate(runs["oracle_16px"], "resized", image_size=16)  # the v3 test split holds 16x16 images
    # The champion saw the same 16x16 test images resized to its 8x8 input: uniform grey stays grey, so it
    # still answers cbb everywhere (macro F1 1/6); the oracle at 16x16 wins.
    assert result.decision.register and _champion_version("resized") == 2
    assert result.champion_metric == pytest.approx(1 / 6)
    assert "re-scored on data version v3 at its 8x8 input" in result.decision.reason


@pytest.mark.slow
def test_a_worse_model_at_a_new_image_size_loses_to_the_champion_scored_at_its_own_size(runs: dict[str, str]) -> None:
    _gate(runs["oracle"], "kept")  # 8x8 inputs
    result = _gate(runs["constant_16px"], "kept", image_size=16)
    assert not result.decision.register and _champion_version("kept") == 1
    assert result.champion_metric == pytest.approx(1.0)  # right on every resized image
    assert _gate_tags(result)[1].startswith("test_macro_f1 0.5000 does not beat the champion's 1.0000 (champion: "
                                            "version 1, re-scored on data version v3 at its 8x8 input")


@pytest.mark.slow
def test_a_withdrawn_registration_gives_the_alias_back_and_deletes_the_version(runs: dict[str, str]) -> None:
    from tasks.register import withdraw_registration

    first = _gate(runs["constant"], "withdrawn")
    withdraw_registration("withdrawn", _gate(runs["oracle"], "withdrawn"))
    assert _champion_version("withdrawn") == 1
    assert [version.version for version in MlflowClient().search_model_versions("name = 'withdrawn'")] == [1]
    withdraw_registration("withdrawn", first)
    assert "champion" not in MlflowClient().get_registered_model("withdrawn").aliases
    assert MlflowClient().search_model_versions("name = 'withdrawn'") == []
