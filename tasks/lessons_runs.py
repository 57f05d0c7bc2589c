"""The lessons study, the part that talks to MLflow and writes the report.

Runs: one top-level study run per study key (tasks.lessons.study_key: every param and the data version); a
study that was interrupted is continued in its own run, not a new one. Under it one run per lesson
(`mlflow.parentRunId`), under each lesson one child run per arm and seed, created and trained by the sweep's
point processes (tasks/sweep_runs.py) with the trial's key as a tag. On a restart, a trial whose child run
finished (or diverged: a measured outcome too) under the same study run is reused, not trained again.

The report (reports/study/: study.md, study.html with the plots embedded, verdicts.json, figures/) is written
from the values read back from the child runs, and logged on the study run.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from tasks.lessons import (DECISION_RULE, HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, Lesson, Trial, Verdict, arm_summary,
                           arm_values, format_effect, markdown_table, summary_rows, trial_key, verdicts)
from tasks.names import DATA_VERSION_TAG, FAILURE_TAG, TAG_PREFIX, stage_done_tag
from tasks.params import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

ROLE_TAG = TAG_PREFIX + "study.role"  # study | lesson | trial
STUDY_KEY_TAG = TAG_PREFIX + "study.key"
LESSON_TAG = TAG_PREFIX + "study.lesson"
TRIAL_KEY_TAG = TAG_PREFIX + "study.trial_key"
SOURCE_TAG = TAG_PREFIX + "study.source_uri"  # the pretrained model the transfer lesson starts from
PARENT_TAG = "mlflow.parentRunId"
MLFLOW_UI = "http://127.0.0.1:5000"  # `mlflow ui` as the README starts it: where the report's run links point
REPORT_DIR = Path("reports/study")
REPORT_ARTIFACTS = "study"


def claim_metrics(lesson: Lesson) -> list[str]:
    """The values a lesson's claims compare (both sides), in claim order: what its report shows per arm."""
    return list(dict.fromkeys(measure.metric for claim in lesson.claims for measure in (claim.better, claim.worse)
                              if measure.arm is not None))


def run_link(experiment_id: str, run_id: str) -> str:
    return f"{MLFLOW_UI}/#/experiments/{experiment_id}/runs/{run_id}"


def _reopen(client: "MlflowClient", run: "Run") -> str:
    """A KILLED or FAILED run continued by this process: RUNNING again, with this process as its owner (so a
    kill of this one is reaped too)."""
    from tasks.tracking import lineage_tags

    client.update_run(run.info.run_id, status="RUNNING")
    if FAILURE_TAG in run.data.tags:  # continued: it is not failed now
        client.delete_tag(run.info.run_id, FAILURE_TAG)
    for key, value in lineage_tags().items():
        client.set_tag(run.info.run_id, key, value)
    return run.info.run_id


def open_study_run(client: "MlflowClient", experiment_id: str, key: str, title: str) -> tuple[str, bool]:
    """The study run for this key: the last one, when it did not finish (continued), else a new one; and
    whether it was continued. Runs left RUNNING by a dead process are reaped (KILLED) first."""
    from tasks.tracking import lineage_tags, reap_orphaned_runs

    reap_orphaned_runs(client, experiment_id)
    found = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'study' and tags.`{STUDY_KEY_TAG}` = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status in ("KILLED", "FAILED"):
        return _reopen(client, found[0]), True
    tags = {ROLE_TAG: "study", STUDY_KEY_TAG: key, **lineage_tags()}
    return client.create_run(experiment_id, run_name=title, tags=tags).info.run_id, False


def open_lesson_run(client: "MlflowClient", experiment_id: str, study_run: str, lesson: Lesson) -> str:
    """The lesson's run under the study run (continued when the study is)."""
    from tasks.tracking import lineage_tags

    found = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{study_run}' and tags.`{ROLE_TAG}` = 'lesson' "
                                                f"and tags.`{LESSON_TAG}` = '{lesson.key}'", max_results=1)
    if found:
        return _reopen(client, found[0])
    tags = {PARENT_TAG: study_run, ROLE_TAG: "lesson", LESSON_TAG: lesson.key, **lineage_tags()}
    return client.create_run(experiment_id, run_name=lesson.title, tags=tags).info.run_id


def diverged(run: "Run") -> bool:
    return run.info.status == "FAILED" and "training diverged" in run.data.tags.get(FAILURE_TAG, "")


def completed(run: "Run", evaluate: bool) -> bool:
    """The trial's outcome is measured: its stages all finished, or its training diverged."""
    done = run.info.status == "FINISHED" and stage_done_tag("evaluate" if evaluate else "train") in run.data.tags
    return done or diverged(run)


def finished_trials(client: "MlflowClient", experiment_id: str, lesson_runs: Sequence[str],
                    trials: Sequence[Trial], study: str) -> dict[str, "Run"]:
    """Trial key -> its completed child run under these lesson runs (what a restart reuses)."""
    wanted = {trial_key(study, trial): trial for trial in trials}
    found: dict[str, Run] = {}
    for lesson_run in lesson_runs:
        for run in client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{lesson_run}'", max_results=1000):
            key = run.data.tags.get(TRIAL_KEY_TAG)
            if key in wanted and completed(run, wanted[key].evaluate):
                found.setdefault(key, run)
    return found


def trial_tags(study: str, trial: Trial) -> dict[str, str]:
    return {ROLE_TAG: "trial", LESSON_TAG: trial.lesson, TAG_PREFIX + "study.arm": trial.arm,
            TAG_PREFIX + "study.seed": str(trial.seed), TRIAL_KEY_TAG: trial_key(study, trial)}


def history(client: "MlflowClient", run_id: str, metric: str) -> list[float]:
    """A per-epoch metric of a run, in epoch order."""
    return [point.value for point in sorted(client.get_metric_history(run_id, metric), key=lambda point: point.step)]


def read_trial_values(client: "MlflowClient", run: "Run", params: Params, classes: int) -> dict[str, float]:
    """The values claims read, from a child run as logged (tasks.lessons.arm_values)."""
    return arm_values(run.data.metrics, history(client, run.info.run_id, "val_accuracy"), diverged(run),
                      params.study, classes)


def log_lesson(client: "MlflowClient", run_id: str, lesson: Lesson, found: Sequence[Verdict], note: str) -> None:
    """The lesson run's verdicts: per claim its effect, interval and outcome (metrics and tags), the note."""
    for number, verdict in enumerate(found, start=1):
        for name, value in (("effect", verdict.effect), ("low", verdict.low), ("high", verdict.high)):
            if math.isfinite(value):
                client.log_metric(run_id, f"claim{number}.{name}", value)
        client.set_tag(run_id, f"{TAG_PREFIX}study.claim{number}", verdict.claim)
        client.set_tag(run_id, f"{TAG_PREFIX}study.verdict{number}", verdict.outcome)
    client.set_tag(run_id, "mlflow.note.content", note)


def end_run(client: "MlflowClient", run_id: str, status: str, reason: str | None = None) -> None:
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status)


# ------------------------------------------------------------------------------------------------ plots


def _per_arm_curves(client: "MlflowClient", runs: Mapping[tuple[str, int], "Run"], metric: str) -> dict[str, list[float]]:
    """The mean over seeds of a per-epoch metric, per arm (epochs every seed of the arm reached)."""
    by_arm: dict[str, list[list[float]]] = {}
    for (arm, _), run in runs.items():
        series = history(client, run.info.run_id, metric)
        if series:
            by_arm.setdefault(arm, []).append(series)
    return {arm: [sum(values) / len(values) for values in zip(*series)] for arm, series in by_arm.items()}


def _artifact_json_or_csv(run_id: str, path: str) -> Any:
    import csv

    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file drowns the progress lines
    with tempfile.TemporaryDirectory() as folder:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=folder))
        except Exception:  # an arm without it (diverged before diagnostics were logged): the panel skips it
            return None
        if local.suffix == ".json":
            return json.loads(local.read_text())
        with local.open() as handle:
            return list(csv.DictReader(handle))


def plot_lesson(client: "MlflowClient", lesson: Lesson, runs: Mapping[tuple[str, int], "Run"],
                values: Mapping[tuple[str, int], Mapping[str, float]], output: Path) -> Path:
    """Per lesson: the per-epoch curve (mean over seeds) per arm, every claim's values per arm and seed, and for
    lesson 1 the activation variance by depth at initialization / for lesson 6 the robustness curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = claim_metrics(lesson)
    extra = lesson.key in ("initialization", "failure_cases")
    panels = 1 + len(metrics) + (2 if lesson.key == "failure_cases" else int(extra))
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    axes = list(axes[0])
    curve_axis = axes.pop(0)
    for arm, curve in _per_arm_curves(client, runs, lesson.curve).items():
        curve_axis.plot(range(1, len(curve) + 1), curve, marker=".", label=arm)
    curve_axis.set(title=f"{lesson.curve} per epoch (mean over seeds)", xlabel="epoch")
    curve_axis.legend(fontsize=7)
    arms = list(lesson.arms)
    for metric in metrics:
        axis = axes.pop(0)
        for position, arm in enumerate(arms):
            found = [per_seed[metric] for (each, _), per_seed in values.items() if each == arm and metric in per_seed]
            axis.scatter([position] * len(found), found, color=f"C{position}")
            if found:
                axis.hlines(sum(found) / len(found), position - 0.3, position + 0.3, color=f"C{position}")
        axis.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=7)
        axis.set_title(f"{metric} (seeds; line: mean)", fontsize=9)
    if lesson.key == "initialization":
        axis = axes.pop(0)
        for arm in arms:
            first = min((seed for (each, seed) in runs if each == arm), default=None)
            rows = _artifact_json_or_csv(runs[(arm, first)].info.run_id, "diagnostics/init_diagnostics.csv") \
                if first is not None else None
            if rows:
                axis.semilogy([int(row["depth"]) for row in rows],
                              [max(float(row["activation_variance"]), 1e-30) for row in rows], marker="o", label=arm)
        axis.set(title="pre-activation variance by depth at init", xlabel="depth")
        axis.legend(fontsize=7)
    if lesson.key == "failure_cases":
        for curve_name, axis in zip(("rotation (degrees)", "blur (sigma)"), axes):
            for arm in arms:
                first = min((seed for (each, seed) in runs if each == arm), default=None)
                details = _artifact_json_or_csv(runs[(arm, first)].info.run_id, "evaluation/failure_analysis.json") \
                    if first is not None else None
                if details:
                    points = details["robustness"][curve_name]
                    axis.plot([point["strength"] for point in points], [point["accuracy"] for point in points],
                              marker="o", label=arm)
            axis.set(title=f"test accuracy vs {curve_name}", xlabel=curve_name)
            axis.legend(fontsize=7)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=90)
    plt.close(figure)
    return output


# ------------------------------------------------------------------------------------------------ report


def lesson_markdown(lesson: Lesson, found: Sequence[Verdict], values: Mapping[tuple[str, int], Mapping[str, float]],
                    runs: Mapping[tuple[str, int], "Run"], experiment_id: str, lesson_run: str, figure: str | None,
                    confidence: float) -> str:
    """A lesson's section: the question, its run, the claims with verdicts, the arms with their runs, the plot."""
    claims = [{"claim": verdict.claim, "compared": verdict.compared, f"effect ({confidence:.0%} CI)": format_effect(verdict),
               "seeds": verdict.seeds, "verdict": f"**{verdict.outcome}**"} for verdict in found]
    shown = [name for name in dict.fromkeys(["val_accuracy", "test_accuracy", *claim_metrics(lesson)])
             if any(name in per_seed for per_seed in values.values())]
    arms = []
    for arm in lesson.arms:
        row: dict[str, Any] = {"arm": arm}
        for name in shown:
            mean, spread, count = arm_summary(values, arm, name)
            row[name] = f"{mean:.3f} ± {spread:.3f}" if count else ""
        row["runs"] = " ".join(f"[seed {seed}]({run_link(experiment_id, run.info.run_id)})"
                               for (each, seed), run in sorted(runs.items(), key=lambda item: item[0][1]) if each == arm)
        arms.append(row)
    parts = [f"## {lesson.title}", "", lesson.question, "",
             f"Lesson run: [{lesson_run}]({run_link(experiment_id, lesson_run)})", "", markdown_table(claims),
             "Arms (mean ± standard deviation over seeds):", "", markdown_table(arms)]
    if figure:
        parts += [f"![{lesson.title}]({figure})", ""]
    return "\n".join(parts)


def study_markdown(header: Mapping[str, str], lesson_verdicts: Sequence[tuple[Lesson, Sequence[Verdict]]],
                   sections: Sequence[str], confidence: float) -> str:
    lines = ["# Lessons study", ""]
    lines += [f"- **{name}**: {value}" for name, value in header.items()]
    lines += ["", "## Summary", "", markdown_table(summary_rows(lesson_verdicts, confidence)), "## Decision rule", "",
              DECISION_RULE, "", *sections]
    return "\n".join(lines) + "\n"


def markdown_to_html(markdown_text: str, folder: Path, title: str) -> str:
    """A self-contained HTML page of the report: the Markdown rendered, every figure embedded as a data URI."""
    import markdown

    from tasks.report import REPORT_STYLE

    def embed(match: re.Match[str]) -> str:
        image = folder / match.group(2)
        encoded = base64.b64encode(image.read_bytes()).decode("ascii")
        return f"![{match.group(1)}](data:image/png;base64,{encoded})"

    body = markdown.markdown(re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", embed, markdown_text), extensions=["tables"])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{REPORT_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_study_report(client: "MlflowClient", params: Params, lesson_list: Sequence[Lesson],
                       lesson_runs: Mapping[str, str], trial_runs: Mapping[Trial, "Run | None"], experiment_id: str,
                       study_run: str, data_version: str | None, classes: int, folder: Path) -> dict[str, Any]:
    """Read every trial's values back from MLflow, judge every claim, log each lesson's verdicts on its run,
    write reports/study/ (study.md, study.html, verdicts.json, figures/) and log it on the study run."""
    study = params.study
    lesson_verdicts, sections, record = [], [], []
    for lesson in lesson_list:
        runs = {(trial.arm, trial.seed): run for trial, run in trial_runs.items()
                if trial.lesson == lesson.key and run is not None and completed(run, trial.evaluate)}
        values = {arm_seed: read_trial_values(client, run, params, classes) for arm_seed, run in runs.items()}
        found = verdicts(lesson, values, study)
        lesson_verdicts.append((lesson, found))
        figure = plot_lesson(client, lesson, runs, values, folder / "figures" / f"{lesson.key}.png") if runs else None
        section = lesson_markdown(lesson, found, values, runs, experiment_id, lesson_runs[lesson.key],
                                  f"figures/{lesson.key}.png" if figure else None, study.confidence)
        sections.append(section)
        log_lesson(client, lesson_runs[lesson.key], lesson, found, section.split("\n![")[0])
        record.append({"lesson": lesson.key, "title": lesson.title, "run_id": lesson_runs[lesson.key],
                       "verdicts": [verdict.__dict__ for verdict in found],
                       "values": [{"arm": arm, "seed": seed, **per_seed} for (arm, seed), per_seed in sorted(values.items())],
                       "runs": {f"{arm}/{seed}": run.info.run_id for (arm, seed), run in runs.items()}})
    header = {
        "study run": f"[{study_run}]({run_link(experiment_id, study_run)})",
        "data version": str(data_version),
        "seeds": ", ".join(map(str, study.seeds)),
        "budget": f"{study.epochs} epochs; model conv blocks {params.model.conv_filters}, dense {params.model.dense_units}; "
                  f"training images per class: {study.train_per_class or 'all'} (lessons 4-5: {study.small_per_class})",
        "trials": f"{sum(run is not None for run in trial_runs.values())} of {len(trial_runs)} with a run",
    }
    markdown_text = study_markdown(header, lesson_verdicts, sections, study.confidence)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"study.md": markdown_text, "study.html": markdown_to_html(markdown_text, folder, "Lessons study"),
             "verdicts.json": json.dumps({"study_run_id": study_run, "data_version": data_version,
                                          "decision_rule": DECISION_RULE, "lessons": record},
                                         indent=1, default=float) + "\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    for name in files:
        client.log_artifact(study_run, str(folder / name), REPORT_ARTIFACTS)
    client.log_artifacts(study_run, str(folder / "figures"), f"{REPORT_ARTIFACTS}/figures")
    outcomes = [verdict.outcome for _, found in lesson_verdicts for verdict in found]
    for name, outcome in (("claims_hold", HOLDS), ("claims_do_not_hold", DOES_NOT_HOLD),
                          ("claims_inconclusive", INCONCLUSIVE)):
        client.log_metric(study_run, name, outcomes.count(outcome))
    summary = summary_rows(lesson_verdicts, study.confidence)
    client.set_tag(study_run, "mlflow.note.content", "Lessons study: every claim, judged from the numbers.\n\n"
                   + markdown_table(summary) + "\n" + DECISION_RULE)
    return {"summary": summary, "markdown": str(folder / "study.md"), "html": str(folder / "study.html"),
            "verdicts_file": str(folder / "verdicts.json")}
