"""A hyper-parameter sweep as a Prefect flow: data prepared once, every point trained and evaluated in parallel
on Dask, one parent MLflow run holding a child run per point, the summary and the best child.

    python -m flows.sweep -S train.learning_rate=0.001,0.01 -S model.dropout=0,0.3       # grid: 4 points
    python -m flows.sweep -S train.learning_rate='loguniform(1e-4,1e-2)' --random 8 --seed 1
    python -m flows.sweep sweep.yaml --workers 2                                         # spec in a file
    CASSAVA_DASK_ADDRESS=tcp://10.0.0.5:8786 python -m flows.sweep sweep.yaml             # an existing cluster

Wiring only: the spec and its points come from `tasks.sweep`, the point processes and the summary from
`tasks.sweep_runs`, the data stages from the training flow. Points run through prefect-dask's DaskTaskRunner:
a `distributed.LocalCluster` (one single-threaded worker process per core, at most one per point; each point's
TensorFlow gets cores / workers threads) or the scheduler at `--address`, CASSAVA_DASK_ADDRESS or the spec's
`dask_address`. The local cluster lives inside this process: its workers exit when it does, even on SIGKILL.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from tasks.params import DEFAULT_PARAMS_FILE, Params, load_params, read_params_tree, workspace_root
from tasks.sweep import SweepSpec, expand_points, load_spec, point_overrides, sweep_title, validate_points

from flows.train_pipeline import run_data_stage  # first: it sets Prefect's logging before Prefect loads
from flows.prefect_api import prefect_api
from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.futures import wait
from tasks.sweep_runs import PointJob, read_outcome, run_point_process

DASK_ADDRESS_ENV = "CASSAVA_DASK_ADDRESS"


@task(cache_policy=NO_CACHE, task_run_name="point {job.number}: {job.label}")
def sweep_point(job: PointJob) -> str:
    """One point, on a Dask worker, in its own process; the child MLflow run id."""
    status = run_point_process(job)
    if status != 0:
        tail = job.log_file.read_text()[-2000:] if job.log_file.exists() else ""
        raise RuntimeError(f"point {job.number} ({job.label}) exited with status {status}; log {job.log_file}:\n{tail}")
    return read_outcome(job)["run_id"]


@task(cache_policy=NO_CACHE)
def gate_best_child(run_id: str, params_file: str | None, base_overrides: list[str]) -> str:
    """The registry gate for the best child only (children skip it: see tasks.sweep_runs); its decision."""
    from tasks.layout import PREPARED_DIR
    from tasks.prepared import PreparedData
    from tasks.register import gate_and_register
    from tasks.tracking import dvc_data_version, set_run_tags

    params = load_params(params_file, base_overrides)
    prepared = PreparedData(workspace_root() / PREPARED_DIR)
    test_images, test_labels = prepared.split("test")
    gate = gate_and_register(
        run_id, params.registry.model_name, params.registry.metric, params.registry.minimum,
        test_images, test_labels, prepared.class_names(), data_version=dvc_data_version(prepared.root),
        top_k=params.evaluate.top_k, batch_size=params.evaluate.batch_size,
    )
    set_run_tags(run_id, gate.tags())  # the gate returns its decision; the run records it
    return gate.decision.reason


def _plan(spec_file: str | None, axes: list[str], random_budget: int | None, seed: int | None,
          metric: str | None, params_file: str | None) -> tuple[SweepSpec, list[dict[str, Any]], list[str], Params]:
    """The spec, its points, the fixed overrides, and every point validated through the params schema."""
    spec = load_spec(spec_file, axes, random_budget, seed, metric)
    points = expand_points(spec)
    fixed = {key: axis[0] for key, axis in spec.parameters.items() if key not in spec.swept_keys}
    base_overrides = point_overrides(fixed)
    base = load_params(params_file, base_overrides)
    validate_points(read_params_tree(params_file), [], points)
    return spec, points, base_overrides, base


@flow(name="cassava-sweep", log_prints=True)
def sweep(
    axes: list[str] | None = None,
    spec_file: str | None = None,
    random_budget: int | None = None,
    seed: int | None = None,
    metric: str | None = None,
    params_file: str | None = None,
    threads_per_point: int | None = None,
    keep_workspaces: bool = False,
) -> dict[str, Any]:
    """Prepare the data once, run every point as a child run, summarize; the parent run id, best child, rows."""
    from mlflow.entities import RunStatus

    from tasks.cli import quiet_libraries
    from tasks.layout import PREPARED_DIR
    from tasks.sweep_runs import collect_results, end_parent_run, log_summary, point_jobs, reopen_parent_run, \
        start_parent_run
    from tasks.tracking import allow_concurrent_writers, configure_tracking, ensure_experiment, experiment_name

    spec, points, base_overrides, base = _plan(spec_file, axes or [], random_budget, seed, metric, params_file)
    quiet_libraries()
    title = sweep_title(spec, len(points))
    sweep_metric = spec.metric or base.registry.metric
    tracking_uri = configure_tracking()
    experiment_id = ensure_experiment(experiment_name(base))
    allow_concurrent_writers(tracking_uri)
    parent_overrides = [*base_overrides, f"tracking.run_name={title}"]
    parent_params = load_params(params_file, parent_overrides)
    parent = start_parent_run(experiment_id, title, {"cassava.sweep.method": spec.method})
    print(f"sweep: {title}: parent MLflow run {parent}")
    sweep_dir = workspace_root() / "sweeps" / parent
    try:
        # The data stages log into the parent, so they always run here (refresh_cache), with transient retries.
        prepare_data = run_data_stage.with_options(refresh_cache=True)
        prepare_data("acquire", parent_params, parent)
        prepare_data("prepare", parent_params, parent)
        reopen_parent_run(parent)
        params_path = Path(params_file).resolve() if params_file else workspace_root() / DEFAULT_PARAMS_FILE
        jobs = point_jobs(points, spec.swept_keys, sweep_dir, workspace_root() / PREPARED_DIR, params_path, parent,
                          experiment_id, tracking_uri, threads_per_point)
        futures = [sweep_point.submit(job) for job in jobs]
        wait(futures)
        results = collect_results(jobs)
        best = log_summary(parent, results, spec.swept_keys, sweep_metric, yaml.safe_dump(spec.as_record(), sort_keys=False),
                           sweep_dir / "summary")
        gate = None
        if best is not None and base.registry.enabled:
            gate = gate_best_child(best.run_id, params_file, base_overrides)
    except (KeyboardInterrupt, SystemExit) as interruption:
        end_parent_run(parent, RunStatus.to_string(RunStatus.KILLED), f"sweep: interrupted ({interruption!r})")
        raise
    except BaseException as error:
        end_parent_run(parent, RunStatus.to_string(RunStatus.FAILED), f"sweep: {type(error).__name__}: {error}")
        raise
    end_parent_run(parent, RunStatus.to_string(RunStatus.FINISHED))
    failed = [result for result in results if result.status != "FINISHED"]
    if not failed and not keep_workspaces:
        shutil.rmtree(sweep_dir, ignore_errors=True)  # everything is in MLflow; failed points keep their logs
    return {
        "parent_run_id": parent,
        "title": title,
        "tracking_uri": tracking_uri,
        "metric": sweep_metric,
        "best_run_id": best.run_id if best else None,
        "gate": gate,
        "results": [result.__dict__ for result in results],
        "failed": len(failed),
    }


def dask_task_runner(address: str | None, workers: int | None, points: int) -> tuple[Any, int | None, str]:
    """prefect-dask's runner for an existing scheduler, else a LocalCluster sized to this machine; also the
    TensorFlow threads per point and a line saying which."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address), None, f"Dask scheduler {address}"
    cores = len(os.sched_getaffinity(0))
    workers = workers or max(1, min(cores, points))
    threads = max(1, cores // workers)  # workers x threads <= cores: TensorFlow in one point must not starve another
    runner = DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        # One task per worker process; the point's own process does the work. The cluster binds to 127.0.0.1
        # only; no dashboard (it would need bokeh, and a port).
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
                        "dashboard_address": None},
    )
    return runner, threads, f"local Dask cluster: {workers} worker(s) x {threads} TensorFlow thread(s), {cores} core(s)"


def run_sweep(axes: list[str], spec_file: str | None = None, random_budget: int | None = None, seed: int | None = None,
              metric: str | None = None, params_file: str | None = None, workers: int | None = None,
              address: str | None = None, keep_workspaces: bool = False) -> dict[str, Any]:
    """Plan (validating every point), choose the Dask cluster, run the flow."""
    spec, points, _, _ = _plan(spec_file, axes, random_budget, seed, metric, params_file)
    address = address or os.environ.get(DASK_ADDRESS_ENV) or spec.dask_address
    runner, threads, where = dask_task_runner(address, workers or spec.workers, len(points))
    print(f"sweep: {len(points)} point(s) on {where}", flush=True)
    # The Dask workers are other processes: prefect_api exports PREFECT_API_URL, so their task runs report to
    # the same server (a running one, else this sweep's private one) instead of each starting its own.
    with prefect_api():
        return sweep.with_options(task_runner=runner)(
            axes=axes, spec_file=spec_file, random_budget=random_budget, seed=seed, metric=metric,
            params_file=params_file, threads_per_point=threads, keep_workspaces=keep_workspaces,
        )


def main(
    spec_file: Annotated[Optional[str], typer.Argument(help="Sweep spec YAML (parameters, method, budget, ...).")] = None,
    axes: Annotated[Optional[list[str]], typer.Option(
        "--set", "-S", help="A swept key: section.key=v1,v2 or section.key=loguniform(a,b) (repeatable); "
                            "one value = a fixed override.")] = None,
    random_budget: Annotated[Optional[int], typer.Option("--random", help="Random search of N points.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the random search.")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="Best = highest (default registry.metric).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Local Dask workers (default: cores).")] = None,
    address: Annotated[Optional[str], typer.Option(
        "--address", help=f"An existing Dask scheduler (default: ${DASK_ADDRESS_ENV}, else a local cluster).")] = None,
    params_file: Annotated[Optional[str], typer.Option("--params", help="Params file (default: params.yaml).")] = None,
    keep_workspaces: Annotated[bool, typer.Option(help="Keep every point's folder under sweeps/.")] = False,
) -> None:
    """Run a grid or random sweep over any params keys; compare the children under one parent in MLflow."""
    from tasks.errors import UserError
    from tasks.preflight import preflight

    try:  # bad points, an unreachable tracking store, ...: one line, before a server or a cluster starts
        preflight(_plan(spec_file, axes or [], random_budget, seed, metric, params_file)[3])
    except UserError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    result = run_sweep(axes or [], spec_file, random_budget, seed, metric, params_file, workers, address,
                       keep_workspaces)
    best = next((row for row in result["results"] if row["run_id"] == result["best_run_id"]), None)
    lines = ["", f"sweep:        {result['title']}", f"parent run:   {result['parent_run_id']}",
             f"children:     {len(result['results']) - result['failed']} finished, {result['failed']} failed"]
    if best:
        lines.append(f"best child:   {best['run_id']} ({result['metric']} {best['metrics'][result['metric']]:.4f})")
    if result["gate"]:
        lines.append(f"registry:     {result['gate']}")
    lines.append(f"compare them: .venv/bin/mlflow ui --backend-store-uri {result['tracking_uri']} --host 127.0.0.1 "
                 "--port 5000  → the parent run → its child runs (select → Compare)")
    typer.echo("\n".join(lines))
    if result["failed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
