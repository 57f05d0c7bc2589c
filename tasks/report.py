"""The HTML report: a header that says which run this is and whether its model is usable, then the evaluation.

The header holds the run's name and id, the params that differ from the defaults, the data version, the test
accuracy next to the majority-class baseline, and the registry gate's decision. Below it, warnings computed from
the numbers say when the model should not be used (`model_warnings`: each rule is a small pure function).

The evaluate stage writes the report with the gate's row pending (`reports/evaluation.html`); the register
stage, which runs after it, fills that row in (`fill_header_row`) and writes `reports/report.html`. So each
file has one writer, and changing only the registry settings re-runs only the cheap register stage.

Pure functions over numbers and paths; nothing here imports TensorFlow, MLflow or matplotlib.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.params import Params, flatten_params

# The standard sections of the HTML report, in reading order (Metrics is always written first).
REPORT_HEADINGS: tuple[str, ...] = (
    "Metrics",
    "Confusion matrix",
    "Calibration",
    "Robustness",
    "Sharp vs blurry",
    "Most confidently wrong",
    "Saliency",
    "Distribution shift",
    "Learning curve",
)
GATE_ROW = "Registry gate"  # the header row the register stage fills in
GATE_PENDING = "not decided yet: the register stage decides after evaluation (reports/report.html)"

ONE_CLASS_SHARE = 0.9  # predicting one class for at least this share of the test images is a collapse
EARLY_STOP_FRACTION = 0.2  # early stopping within this fraction of the planned epochs is "very early"


# --------------------------------------------------------------------------------------------- warnings


def one_class_warning(predicted: np.ndarray, actual: np.ndarray, class_names: Sequence[str]) -> str | None:
    """The model answers one class for (almost) every test image, far more often than that class occurs."""
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    if len(predicted) == 0:
        return None
    counts = np.bincount(predicted, minlength=len(class_names))
    top = int(counts.argmax())
    share, true_share = counts[top] / len(predicted), float(np.mean(actual == top))
    if share < ONE_CLASS_SHARE or true_share >= ONE_CLASS_SHARE:
        return None
    return (f"the model predicts '{class_names[top]}' for {share:.0%} of the test images (it is {true_share:.0%} "
            "of them): it has collapsed to one class and has not learned to tell the classes apart")


def baseline_warning(accuracy: float, baseline_accuracy: float, baseline_class: str) -> str | None:
    """The model is no more accurate than always answering the training split's majority class."""
    if accuracy > baseline_accuracy:
        return None
    return (f"test accuracy {accuracy:.3f} does not beat the majority-class baseline {baseline_accuracy:.3f} "
            f"(always answering '{baseline_class}')")


def early_training_warning(best_epoch: int, stopped_epoch: int, epochs_run: int, epochs_planned: int) -> str | None:
    """Training kept the first epoch's weights, or early stopping ended it within its first epochs."""
    if epochs_run > 1 and best_epoch <= 1:
        return (f"the final model is epoch {best_epoch}'s of {epochs_run}: validation never improved after the "
                "first epoch (learning rate, initialization or data worth checking)")
    if 0 < stopped_epoch <= max(2, math.ceil(EARLY_STOP_FRACTION * epochs_planned)):
        return (f"early stopping ended training at epoch {stopped_epoch} of {epochs_planned} planned: "
                "the model barely trained")
    return None


def shift_warning(verdict: str, classifier_auc: float, threshold: float) -> str | None:
    """The train/test two-sample test fired: test accuracy may not say how the model does on training-like data."""
    from tasks.analysis import SHIFT_DETECTED

    if verdict != SHIFT_DETECTED:
        return None
    return (f"train and test images differ (two-sample classifier AUC {classifier_auc:.3f} >= {threshold}): "
            "the test metrics describe another distribution than the one the model learned")


def model_warnings(
    predicted: np.ndarray, actual: np.ndarray, class_names: Sequence[str], accuracy: float,
    baseline: tuple[int, float], train_summary: Mapping[str, Any] | None, epochs_planned: int,
    shift: Mapping[str, Any],
) -> list[str]:
    """Every warning that applies, in reading order (the gravest first)."""
    baseline_class, baseline_accuracy = baseline
    found = [
        one_class_warning(predicted, actual, class_names),
        baseline_warning(accuracy, baseline_accuracy, class_names[baseline_class]),
        early_training_warning(int(train_summary["best_epoch"]), int(train_summary["stopped_epoch"]),
                               int(train_summary["epochs_run"]), epochs_planned) if train_summary else None,
        shift_warning(str(shift["verdict"]), float(shift["classifier_auc"]), float(shift["auc_threshold"])),
    ]
    return [warning for warning in found if warning]


# --------------------------------------------------------------------------------------------- header


def changed_params(params: Params) -> dict[str, str]:
    """The params that differ from the schema's defaults (which `params.yaml` ships), flattened as MLflow logs
    them. Compared as values, so `0` and `0.0` are the same."""
    defaults, current = _leaves(Params().model_dump()), _leaves(params.model_dump())
    flat = flatten_params(params)
    return {key: flat[key] for key, value in current.items() if defaults.get(key, object()) != value}


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        leaves.update(_leaves(value, name) if isinstance(value, Mapping) else {name: value})
    return leaves


def report_header(
    run_name: str, run_id: str, params: Params, data_version: str | None, accuracy: float,
    baseline: tuple[int, float], class_names: Sequence[str],
) -> dict[str, str]:
    """The header rows, in order: what run this is and what it was trained on, and the headline number."""
    changed = changed_params(params)
    baseline_class, baseline_accuracy = baseline
    return {
        "Run": f"{run_name} ({run_id})",
        "Params changed from defaults": ", ".join(f"{key}={value}" for key, value in changed.items()) or "none",
        "Data version": data_version or "unknown",
        "Test accuracy": f"{accuracy:.4f} (majority-class baseline {baseline_accuracy:.4f}: always "
                         f"'{class_names[baseline_class]}')",
        GATE_ROW: GATE_PENDING,
    }


def fill_header_row(page: str, row: str, value: str) -> str:
    """The report's HTML with one header row's value replaced (the register stage fills in the gate)."""
    cell = re.compile(rf'(<td id="{_row_id(row)}">).*?(</td>)', re.DOTALL)
    filled, count = cell.subn(lambda match: match.group(1) + html.escape(value) + match.group(2), page, count=1)
    if count != 1:
        raise ValueError(f"the report has no header row {row!r}: write it with write_html_report first")
    return filled


def _row_id(row: str) -> str:
    return "header-" + re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


# --------------------------------------------------------------------------------------------- HTML

TableData = Mapping[str, Any] | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class ReportSection:
    """One headed section of the HTML report: an optional paragraph, figure and table, in that order.

    `table` is either a mapping (written as a name / value table) or a list of rows (columns in first-seen order).
    """

    heading: str
    text: str = ""
    image: Path | None = None
    table: TableData | None = None


REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #2e7d32; padding-bottom: 0.2em; }
h2 { color: #2e7d32; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f1f8e9; }
table.header th { width: 14em; }
.warnings { background: #fff3e0; border-left: 6px solid #e65100; padding: 0.4em 1em; margin: 1em 0; }
.warnings h2 { color: #e65100; margin-top: 0.3em; }
img { max-width: 100%; border: 1px solid #eee; }
nav a { margin-right: 1em; }
"""

_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
                ".gif": "image/gif"}


def write_html_report(
    path: Path, title: str, metrics: Mapping[str, float], sections: Sequence[ReportSection],
    header: Mapping[str, str] | None = None, warnings: Sequence[str] = (),
) -> Path:
    """Write one self-contained HTML file: the header rows, the warnings, a Metrics table, then `sections` in
    order, images as data URIs.

    Nothing is linked (no external CSS, JavaScript or images), so the file opens anywhere and can be logged
    to MLflow as a single artifact. All text is HTML-escaped.
    """
    all_sections = [ReportSection("Metrics", table=dict(sorted(metrics.items()))), *sections]
    anchors = [f"section-{number}" for number in range(len(all_sections))]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if header:
        parts.append('<table class="header"><tbody>' + "".join(
            f'<tr><th>{html.escape(row)}</th><td id="{_row_id(row)}">{html.escape(value)}</td></tr>'
            for row, value in header.items()
        ) + "</tbody></table>")
    if warnings:
        parts.append('<div class="warnings" id="warnings"><h2>Warnings</h2><ul>'
                     + "".join(f"<li>{html.escape(warning)}</li>" for warning in warnings) + "</ul></div>")
    parts.append("<nav>" + "".join(
        f'<a href="#{anchor}">{html.escape(section.heading)}</a>' for anchor, section in zip(anchors, all_sections)
    ) + "</nav>")
    for anchor, section in zip(anchors, all_sections):
        parts.append(f'<section id="{anchor}"><h2>{html.escape(section.heading)}</h2>')
        if section.text:
            parts.extend(f"<p>{html.escape(paragraph)}</p>" for paragraph in section.text.split("\n\n"))
        if section.image is not None:
            parts.append(_image_tag(Path(section.image), section.heading))
        if section.table is not None:
            parts.append(_table_html(section.table))
        parts.append("</section>")
    parts.append("</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _image_tag(image: Path, alt: str) -> str:
    mime = _IMAGE_TYPES.get(image.suffix.lower())
    if mime is None:
        raise ValueError(f"{image}: cannot embed a {image.suffix!r} file; use one of {', '.join(_IMAGE_TYPES)}")
    encoded = base64.b64encode(image.read_bytes()).decode("ascii")
    return f'<figure><img src="data:{mime};base64,{encoded}" alt="{html.escape(alt)}"></figure>'


def _table_html(table: TableData) -> str:
    if isinstance(table, Mapping):
        rows: Sequence[Mapping[str, Any]] = [{"name": key, "value": value} for key, value in table.items()]
    else:
        rows = table
    columns = list(dict.fromkeys(key for row in rows for key in row))
    header = "".join(f"<th>{html.escape(str(column))}</th>" for column in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format_value(row.get(column, '')))}</td>" for column in columns) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _format_value(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_format_value(item) for item in value)
    return str(value)
