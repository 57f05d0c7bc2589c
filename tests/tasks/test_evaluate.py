"""Evaluation metrics against a hand-computed case, the report files dvc plots / MLflow read, and the evaluate and
register stages end to end: console, report, run."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from tasks import layout
from tasks.data import acquire, prepare_dataset
from tasks.evaluate import write_reports
from tasks.names import CLASSES_TAG, GATE_DECISION_TAG, GATE_REASON_TAG
from tasks.params import Params, code_root, load_params
from tasks.prepared import PreparedData
from tasks.report import GATE_PENDING
from tasks.scoring import score_predictions
from tasks.tracking import StageRecord, dvc_data_version, write_pointer
from tests.conftest import tiny_params_tree
from tests.helpers import module_workspace

if TYPE_CHECKING:
    import keras

# Six images, three classes. Predicted (argmax) = [0, 1, 1, 1, 2, 0]; second choices make top-2 = 5/6.
LABELS = np.array([0, 0, 1, 1, 2, 2])
PROBABILITIES = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.3, 0.6, 0.1],  # true 0, second choice 0: top-2 hit
        [0.1, 0.8, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.1, 0.8],
        [0.6, 0.3, 0.1],  # true 2, ranked last: top-2 miss
    ]
)


def test_metrics_match_a_hand_computed_case() -> None:
    evaluation = score_predictions(PROBABILITIES, LABELS, ["cbb", "cmd", "healthy"], top_k=2)
    metrics = evaluation.metrics
    assert metrics["test_accuracy"] == pytest.approx(4 / 6)
    assert metrics["test_top2_accuracy"] == pytest.approx(5 / 6)
    assert metrics["test_precision.cbb"] == pytest.approx(1 / 2)
    assert metrics["test_precision.cmd"] == pytest.approx(2 / 3)
    assert metrics["test_recall.cmd"] == pytest.approx(1.0)
    assert metrics["test_recall.healthy"] == pytest.approx(1 / 2)
    assert metrics["test_macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["test_support.healthy"] == 2
    assert evaluation.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_reports_for_dvc_and_mlflow(tmp_path: Path) -> None:
    history = tmp_path / "history.csv"
    history.write_text(
        "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate\n1,1.0,0.5,1.1,0.4,0.01\n2,0.8,0.6,0.9,0.5,0.005\n"
    )
    evaluation = score_predictions(PROBABILITIES, LABELS, ["cbb", "cmd", "healthy"], top_k=2)
    written = write_reports(evaluation, history, tmp_path / "reports")
    assert {path.name for path in written} == {
        "metrics.json", "test_predictions.csv", "confusion_matrix.png", "learning_curves.png"
    }
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["test_accuracy"] == pytest.approx(4 / 6)
    with (tmp_path / "reports/test_predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows[1] == {"actual": "cbb", "predicted": "cmd"} and len(rows) == 6
    assert (tmp_path / "reports/figures/confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


# ---- the evaluate and register stages, end to end on a tiny workspace -----------------------------------------


@dataclass(frozen=True)
class Staged:
    root: Path
    console: dict[str, str]  # stage -> what its command printed (stdout and stderr)
    run_id: str


def _collapsed_model(params: Params, class_names: list[str]) -> "keras.Model":
    """The pipeline's CNN, untrained, with its output bias set so that it answers 'cbsd' for every image."""
    from tasks.model import build_classifier

    model = build_classifier(params.model, params.data.image_size, len(class_names), params.train.seed)
    head = model.get_layer("probabilities")
    kernel, bias = head.get_weights()
    bias[class_names.index("cbsd")] = 50.0
    head.set_weights([kernel, bias])
    return model


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Staged:
    """A prepared tiny workspace with a model that collapsed to one class, as `train` leaves it (model, history,
    summary with best epoch 1, pointer), then `python -m tasks.cli evaluate` and `... register` as DVC runs
    them: each in a fresh process, so the console is exactly what a user sees."""
    root = tmp_path_factory.mktemp("staged")
    # Batches of 8 on a 20-image test split: three batch shapes, the case that made Keras retrace.
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_tree(["evaluate.batch_size=8"]), sort_keys=False))
    with module_workspace(root):
        params = load_params(root / "params.yaml")
        acquire(params.data, root / layout.RAW_DIR)
        prepare_dataset(params.data, root / layout.RAW_DIR, root / layout.PREPARED_DIR)
        prepared = PreparedData(root / layout.PREPARED_DIR)
        model_dir = root / layout.MODEL_DIR
        model_dir.mkdir(parents=True)
        _collapsed_model(params, prepared.class_names()).save(model_dir / "model.keras")
        np.save(model_dir / "input_example.npy", np.asarray(prepared.split("val")[0][:2], dtype=np.float32))
        (root / layout.HISTORY_FILE).write_text(
            "epoch,loss,accuracy,val_loss,val_accuracy,learning_rate\n"
            "1,1.6,0.2,1.6,0.2,0.002\n2,1.6,0.2,1.7,0.2,0.001\n3,1.6,0.2,1.7,0.2,0.0005\n"
        )
        (root / layout.TRAIN_SUMMARY_FILE).write_text(json.dumps({"epochs_run": 3, "best_epoch": 1, "stopped_epoch": 0}))
        # The training's record, as its pointer carries it to a new run (its own run is not in this store).
        record = StageRecord("train", metrics={"train.best_epoch": 1.0}, tags={CLASSES_TAG: ",".join(prepared.class_names())},
                             model_dir=layout.MODEL_DIR.as_posix(), run_id="0" * 32)
        write_pointer(root / layout.TRAIN_POINTER, "0" * 32, [record])

        console = {}
        environment = {**os.environ, "CASSAVA_WORKSPACE": str(root)}
        for stage in ("evaluate", "register"):
            result = subprocess.run([sys.executable, "-m", "tasks.cli", stage], cwd=code_root(), env=environment,
                                    capture_output=True, text=True, timeout=600)
            console[stage] = result.stdout + result.stderr
            assert result.returncode == 0, console[stage][-3000:]
        yield Staged(root, console, json.loads((root / layout.REGISTER_POINTER).read_text())["run_id"])


@pytest.mark.slow
def test_evaluation_console_has_no_retracing_warnings_or_progress_bars(staged: Staged) -> None:
    for stage in ("evaluate", "register"):
        assert "retracing" not in staged.console[stage]
        assert "━" not in staged.console[stage] and "1/1" not in staged.console[stage]
    assert "evaluate: robustness curves" in staged.console["evaluate"]  # the long steps say what they do


@pytest.mark.slow
def test_report_shows_header_warnings_and_the_gate_decision(staged: Staged) -> None:
    registry = json.loads((staged.root / layout.REGISTRY_FILE).read_text())
    metrics = json.loads((staged.root / layout.METRICS_FILE).read_text())
    assert registry["decision"] == "rejected"
    assert registry["reason"] == f"test_macro_f1 {metrics['test_macro_f1']:.4f} is below the minimum 0.3000"

    pending = (staged.root / layout.EVALUATION_REPORT).read_text()
    page = (staged.root / layout.REPORT_FILE).read_text()
    header = dict(re.findall(r'<tr><th>(.*?)</th><td id="header-[a-z-]+">(.*?)</td></tr>', page))
    assert header["Registry gate"] == html.escape(f"rejected: {registry['reason']}")
    assert html.escape(GATE_PENDING) in pending and GATE_PENDING not in html.unescape(page)
    assert header["Run"].endswith(f"({staged.run_id})")
    assert header["Params changed from defaults"].startswith("data.image_size=32, ")
    assert header["Data version"] == dvc_data_version(staged.root / layout.PREPARED_DIR)
    baseline = json.loads((staged.root / layout.ALL_METRICS_FILE).read_text())["test_majority_baseline_accuracy"]
    assert html.unescape(header["Test accuracy"]).startswith(
        f"{metrics['test_accuracy']:.4f} (majority-class baseline {baseline:.4f}")
    warnings = re.findall(r"<li>(.*?)</li>", page.split('id="warnings"')[1].split("</div>")[0])
    assert len(warnings) >= 3
    assert "predicts &#x27;cbsd&#x27; for 100% of the test images" in warnings[0]
    assert "does not beat the majority-class baseline" in warnings[1]
    assert "epoch 1&#x27;s of 3" in warnings[2]


@pytest.mark.slow
def test_the_run_holds_the_evaluation_and_the_gate(staged: Staged) -> None:
    run = MlflowClient(f"sqlite:///{staged.root / 'mlflow.db'}").get_run(staged.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[GATE_DECISION_TAG] == "rejected"
    assert run.data.tags[GATE_REASON_TAG] == json.loads((staged.root / layout.REGISTRY_FILE).read_text())["reason"]
    assert run.data.tags["cassava.stage.evaluate"] == run.data.tags["cassava.stage.register"] == "done"
    assert run.data.metrics["test_accuracy"] == pytest.approx(
        json.loads((staged.root / layout.METRICS_FILE).read_text())["test_accuracy"])
    pointer = json.loads((staged.root / layout.REGISTER_POINTER).read_text())
    assert [record["stage"] for record in pointer["records"]] == ["train", "evaluate", "register"]
    assert pointer["records"][-1]["tags"][GATE_DECISION_TAG] == "rejected"  # carried over by later runs
