"""Sweeps, the part that runs things: one point per process, the parent MLflow run, the summary.

Each point trains and evaluates in its own process (`python -m tasks.sweep_runs <job.json>`), so TensorFlow's
global state never leaks from one point into the next, and with its own workspace folder
(`sweeps/<parent run>/point-NN/`, CASSAVA_WORKSPACE) so the stage files of concurrent points (models/,
reports/, training backups) never collide; `data/prepared` in it is a link to the one prepared copy, which
every point reads and none writes. The child MLflow run is created under the parent (`mlflow.parentRunId`)
and then the normal train and evaluate stages log into it.

Children do not pass the registry gate themselves (`registry.enabled=false` in each point): four children
racing the gate could each read the same champion and each register. The parent gates only the best child,
once, after every point has ended, so the registry ends with one `champion`.

A point's process stops itself when the process that launched it dies (a Dask worker whose sweep was
killed), so nothing outlives a sweep; its MLflow run then ends KILLED through the stage's SIGTERM handling.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tasks.params import code_root
from tasks.sweep import PointResult

log = logging.getLogger(__name__)

ROLE_TAG = "cassava.sweep.role"  # parent | child
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests children by
POINT_TAG = "cassava.sweep.point"
BEST_RUN_TAG = "cassava.sweep.best_run_id"
SWEEP_ARTIFACTS = "sweep"
KILL_GRACE_S = 30  # after SIGTERM, how long a point may take to end its MLflow run before it is killed


@dataclass
class PointJob:
    """Everything one point's process needs, as JSON (it may run on another machine's Dask worker)."""

    number: int
    point: dict[str, Any]
    label: str
    overrides: list[str]  # base + point + the child's own (run name, registry off)
    params_file: str
    workspace: str  # the point's own workspace folder
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    threads: int | None  # TensorFlow intra-op threads; None: TensorFlow's default (all cores)
    # The sweep's own process: a point on the same host stops when it dies, without waiting for Dask's worker
    # (its direct parent) to notice that the scheduler inside the sweep is gone, which can take a minute.
    sweep_host: str = ""
    sweep_pid: int = 0
    tags: dict[str, str] = field(default_factory=dict)  # more tags of the child run (e.g. a study's arm key)
    evaluate: bool = True  # false: train only (a study arm whose claims read training metrics only)

    @property
    def outcome_file(self) -> Path:
        return Path(self.workspace) / "point.json"

    @property
    def log_file(self) -> Path:
        return Path(self.workspace) / "point.log"


def point_jobs(points: Sequence[dict[str, Any]], keys: Sequence[str], sweep_dir: Path, prepared_dir: Path,
               params_file: Path, parent_run_id: str, experiment_id: str, tracking_uri: str,
               threads: int | None) -> list[PointJob]:
    """A job per point, each with its workspace made (see point_job)."""
    from tasks.sweep import describe_point, point_overrides

    return [point_job(number, point, describe_point(point, keys), point_overrides(point),
                      sweep_dir / f"point-{number:02d}", prepared_dir, params_file, parent_run_id, experiment_id,
                      tracking_uri, threads)
            for number, point in enumerate(points, start=1)]


def point_job(number: int, point: dict[str, Any], label: str, overrides: Sequence[str], workspace: Path,
              prepared_dir: Path, params_file: Path, parent_run_id: str, experiment_id: str, tracking_uri: str,
              threads: int | None, tags: dict[str, str] | None = None, evaluate: bool = True) -> PointJob:
    """One point's job, its workspace made: the point's overrides plus the child's own (its run name is the
    label; the registry gate is the parent's, see the module doc)."""
    make_point_workspace(workspace, prepared_dir)
    overrides = [*overrides, f"tracking.run_name={label}", "registry.enabled=false"]
    return PointJob(number, dict(point), label, overrides, str(params_file), str(workspace), parent_run_id,
                    experiment_id, tracking_uri, threads, socket.gethostname(), os.getpid(), dict(tags or {}),
                    evaluate)


def make_point_workspace(workspace: Path, prepared_dir: Path) -> None:
    """A fresh workspace whose data/prepared is a link to the shared prepared data."""
    (workspace / "data").mkdir(parents=True, exist_ok=True)
    link = workspace / "data" / "prepared"
    if not link.is_symlink():
        link.symlink_to(prepared_dir.resolve(), target_is_directory=True)


def run_point_process(job: PointJob) -> int:
    """Run one point in a child process (blocking); its exit status. Called on a Dask worker."""
    workspace = Path(job.workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    job_file = workspace / "job.json"
    job_file.write_text(json.dumps(asdict(job), indent=1))
    env = {key: value for key, value in os.environ.items() if key not in ("DVC_ROOT", "PREFECT_API_URL")}
    env.update(
        CASSAVA_WORKSPACE=str(workspace),
        MLFLOW_TRACKING_URI=job.tracking_uri,
        PYTHONPATH=os.pathsep.join(filter(None, [str(code_root()), os.environ.get("PYTHONPATH")])),
        TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
        TQDM_DISABLE="1",
    )
    if job.threads:
        # Set before TensorFlow starts in the child: its thread pools are sized once, at start-up.
        env.update(TF_NUM_INTRAOP_THREADS=str(job.threads), TF_NUM_INTEROP_THREADS="1",
                   OMP_NUM_THREADS=str(job.threads))
    with job.log_file.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "tasks.sweep_runs", str(job_file)], cwd=workspace,
                                   env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            return process.wait()
        except BaseException:  # the task was cancelled: the point must not run on alone
            process.terminate()
            try:
                process.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
            raise


def read_outcome(job: PointJob) -> dict[str, Any]:
    """What the point's process recorded: its run id (written first) and how it ended."""
    try:
        return json.loads(job.outcome_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _stop_when_orphaned(launcher_pid: int, sweep_pid: int | None) -> None:
    """Watch the launching process (and the sweep's, when on this host); when one is gone, SIGTERM this one
    (the stage ends its run KILLED), then SIGKILL it if it has not exited after a grace period."""
    import psutil

    def sweep_alive() -> bool:
        try:  # a SIGKILLed sweep can linger as a zombie until its parent reaps it: that is gone too
            return psutil.Process(sweep_pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def watch() -> None:
        while os.getppid() == launcher_pid and (not sweep_pid or sweep_alive()):
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(KILL_GRACE_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _set_tensorflow_threads(threads: int | None) -> None:
    if not threads:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def run_point(job: PointJob) -> None:
    """In the point's process: create the child run under the parent, then train and evaluate into it."""
    from mlflow import MlflowClient
    from mlflow.entities import RunStatus

    from tasks.cli import configure_logging
    from tasks.evaluate import run_evaluate
    from tasks.params import load_params
    from tasks.names import FAILURE_TAG
    from tasks.tracking import configure_tracking, lineage_tags
    from tasks.train import run_train

    configure_logging()
    params = load_params(job.params_file, job.overrides)
    _set_tensorflow_threads(job.threads)
    configure_tracking()
    client = MlflowClient()
    tags = {PARENT_TAG: job.parent_run_id, ROLE_TAG: "child", POINT_TAG: str(job.number), **lineage_tags(), **job.tags}
    run_id = client.create_run(job.experiment_id, run_name=job.label, tags=tags).info.run_id
    job.outcome_file.write_text(json.dumps({"run_id": run_id}))
    started = time.monotonic()
    try:
        run_train(params, run_id)
        if job.evaluate:
            run_evaluate(params, run_id)
    except BaseException as error:
        if client.get_run(run_id).info.status == "RUNNING":  # failed before a stage could end it
            client.set_tag(run_id, FAILURE_TAG, f"sweep point: {type(error).__name__}: {error}"[:5000])
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    finally:
        job.outcome_file.write_text(json.dumps({"run_id": run_id, "duration_s": time.monotonic() - started}))


def collect_results(jobs: Sequence[PointJob]) -> list[PointResult]:
    """Each point's child run as it ended: status and final metrics, read back from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient()
    results = []
    for job in jobs:
        outcome = read_outcome(job)
        run = client.get_run(outcome["run_id"]) if outcome.get("run_id") else None
        status = run.info.status if run else "NOT STARTED"
        results.append(PointResult(job.number, job.point, outcome.get("run_id"), status,
                                   dict(run.data.metrics) if run else {}, outcome.get("duration_s")))
    return results


def start_parent_run(experiment_id: str, title: str, tags: dict[str, str]) -> str:
    """The sweep's parent run, RUNNING (with host/pid lineage, so a killed sweep's run is reaped KILLED)."""
    from mlflow import MlflowClient

    from tasks.tracking import lineage_tags

    run = MlflowClient().create_run(experiment_id, run_name=title, tags={ROLE_TAG: "parent", **lineage_tags(), **tags})
    return run.info.run_id


def reopen_parent_run(run_id: str) -> None:
    """The data stages end the parent FINISHED; it runs on while the points do."""
    from mlflow import MlflowClient

    MlflowClient().update_run(run_id, status="RUNNING")


def end_parent_run(run_id: str, status: str, reason: str | None = None) -> None:
    from mlflow import MlflowClient

    from tasks.names import FAILURE_TAG

    client = MlflowClient()
    if reason:
        client.set_tag(run_id, FAILURE_TAG, reason[:5000])
    client.set_terminated(run_id, status)


def log_summary(run_id: str, results: Sequence[PointResult], keys: Sequence[str], metric: str,
                spec_yaml: str, folder: Path) -> PointResult | None:
    """The parent's summary: table (CSV + markdown, also the run's description), plot of the metric against
    every swept key, the spec, and the best child (tags + metric). Returns the best child."""
    from mlflow import MlflowClient

    from tasks.sweep import best_result, describe_point, summary_csv, summary_markdown, summary_rows

    client = MlflowClient()
    best = best_result(results, metric)
    header, rows = summary_rows(results, keys, metric)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "summary.csv": summary_csv(header, rows),
        "summary.md": summary_markdown(header, rows, best.number if best else None),
        "spec.yaml": spec_yaml,
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    plot = plot_metric_vs_keys(results, keys, metric, best, folder / "metric_vs_params.png")
    for path in [*(folder / name for name in files), plot]:
        client.log_artifact(run_id, str(path), SWEEP_ARTIFACTS)
    finished = sum(result.status == "FINISHED" for result in results)
    tags = {
        "mlflow.note.content": f"Sweep over {', '.join(keys)}; best by {metric}.\n\n" + files["summary.md"],
        "cassava.sweep.keys": ",".join(keys),
        "cassava.sweep.points": str(len(results)),
        "cassava.sweep.finished": str(finished),
        "cassava.sweep.metric": metric,
    }
    if best:
        tags.update({BEST_RUN_TAG: best.run_id or "", "cassava.sweep.best_point": describe_point(best.point, keys)})
        client.log_metric(run_id, f"best_{metric}", best.metrics[metric])
        client.set_tag(best.run_id, "cassava.sweep.best", "true")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return best


def plot_metric_vs_keys(results: Sequence[PointResult], keys: Sequence[str], metric: str,
                        best: PointResult | None, output: Path) -> Path:
    """One panel per swept key: the metric of every finished child against the key's value (best in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.sweep import short_name

    finished = [result for result in results if metric in result.metrics]
    figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for axis, key in zip(axes[0], keys):
        values = [result.point[key] for result in finished]
        numeric = all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values)
        labels = list(dict.fromkeys(str(value) for value in values))  # categories in the sweep's order
        xs = values if numeric else [labels.index(str(value)) for value in values]
        axis.scatter(xs, [result.metrics[metric] for result in finished], color="tab:blue")
        if best is not None and best in finished:
            x = best.point[key] if numeric else labels.index(str(best.point[key]))
            axis.scatter([x], [best.metrics[metric]], color="tab:red", s=80, label="best")
            axis.legend()
        if numeric and values and min(values) > 0 and max(values) / min(values) >= 20:
            axis.set_xscale("log")
        if not numeric:
            axis.set_xticks(range(len(labels)), labels)
        axis.set_xlabel(key)
        axis.set_ylabel(metric)
        axis.set_title(f"{metric} vs {short_name(key, keys)}")
    figure.tight_layout()
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def main(argv: Sequence[str]) -> int:
    """`python -m tasks.sweep_runs <job.json>`: one point, in this process."""
    job = PointJob(**json.loads(Path(argv[0]).read_text()))
    _stop_when_orphaned(os.getppid(), job.sweep_pid if job.sweep_host == socket.gethostname() else None)
    run_point(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
