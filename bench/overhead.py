"""Fixed overhead of the orchestrated training run (Prefect flow + MLflow tracking) over a plain Keras fit.

The same training (model, params, epochs; early stopping unable to stop it) is run, each time in a fresh
Python process and on the same already-prepared data, as

  plain        Keras `fit` on the prepared arrays loaded into RAM (numpy, same batch size, validation split,
               optimizer and schedule; `seed_everything` first). Nothing saved, nothing logged.
  flow         a Prefect flow (defined here, shaped like flows.train_pipeline) that runs the project's train
               task `flows.train_pipeline.run_stage("train", params, None)`: MLflow run set-up, live per-epoch
               metrics, checkpoints, the post-fit evaluations, saved outputs, the logged MLflow model. No
               PREFECT_API_URL: Prefect starts its temporary server, as it does for a user with no server.
  flow-server  the same flow with PREFECT_API_URL pointing at a temporary Prefect server that this script
               started beforehand (the same `SubprocessASGIServer` Prefect would start, bound to 127.0.0.1).
  floor        Prefect's own floor: a bare `@flow` calling one empty `@task`, nothing else imported, with
               Prefect's temporary server (what any Prefect flow pays, whatever it runs).
  floor-server the same bare flow with the pre-started server.
  mlflow-floor MLflow's own floor: import mlflow, open the workspace's SQLite store, start a run, log the
               params and one metric, end it (MLflow's API only, no project code, no training).

The stage and flow children end as the project's entries end (`python -m tasks.cli train` is called as
`tasks.cli.main()`; the flow child ends with `tasks.errors.exit_without_teardown` as
`python -m flows.train_pipeline` does, where the project has it). The floors and plain end as Python does.

Each is timed from process launch to process exit (wall, and CPU time of the process and its children,
e.g. Prefect's server). Inside the children, the project's functions are wrapped with timers (monkeypatched
in the child only; no project file is touched) so the overhead b - a can be broken down. One warm-up run
(a cold first run: it creates mlflow.db and the Prefect database) is reported separately, not in medians.

    .venv/bin/python bench/overhead.py                 # 3 repeats, 5 epochs, default params.yaml
    .venv/bin/python bench/overhead.py --repeats 5 --epochs 5 --modes plain flow flow-server
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The project code: the snapshot a parent benchmark hands its children, else this checkout.
sys.path.insert(1, os.environ.get("CASSAVA_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

import _common as common  # noqa: E402

MODES = ("plain", "stage", "flow", "flow-server", "floor", "floor-server", "mlflow-floor")
# Each orchestrated mode's bare baselines: Prefect's own floor (the one its target is relative to), MLflow's.
FLOORS = {"stage": ("mlflow-floor",), "flow": ("floor", "mlflow-floor"), "flow-server": ("floor-server", "mlflow-floor")}
# Fixed per-run overhead targets (issue 11), seconds; "flow" is relative: Prefect's floor + 4 s.
TARGETS = {"stage": 3.0, "flow-server": 4.0, "flow": 4.0}


def training_overrides(epochs: int) -> list[str]:
    # Fixed number of epochs: early stopping cannot stop it.
    return [f"train.epochs={epochs}", "train.early_stopping.patience=1000"]


# ----------------------------------------------------------------------------------------------- children


class Recorder:
    """Accumulated seconds per label, named instants, written as JSON when the process exits."""

    def __init__(self, out: Path) -> None:
        self.first_line = time.time()
        self.origin = time.perf_counter()
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.marks: dict[str, float] = {}
        self.out = out
        atexit.register(self.write)  # registered first: runs after every atexit handler registered later

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter() - self.origin

    @contextlib.contextmanager
    def phase(self, label: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[label] += time.perf_counter() - started
            self.calls[label] += 1

    def wrap(self, owner: Any, attribute: str, label: str, optional: bool = False) -> None:
        if optional and not hasattr(owner, attribute):
            return
        original: Callable = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(label):
                return original(*args, **kwargs)

        setattr(owner, attribute, timed)

    def write(self) -> None:
        self.mark("atexit_last")
        payload = {
            "first_line": self.first_line,
            "atexit_last_abs": time.time(),
            "seconds": dict(self.seconds),
            "calls": dict(self.calls),
            "marks": self.marks,
        }
        self.out.write_text(json.dumps(payload, indent=1))


def child_plain(args: argparse.Namespace, rec: Recorder) -> None:
    import math

    with rec.phase("import tensorflow+keras"):
        import keras  # noqa: F401  (timed: the import cost)
        import numpy as np
        import tensorflow  # noqa: F401
    with rec.phase("import project modules"):
        from tasks import layout
        from tasks.model import build_classifier
        from tasks.params import load_params, workspace_root
        from tasks.prepared import PreparedData
        from tasks.train import build_optimizer, seed_everything

    params = load_params(None, training_overrides(args.epochs))
    with rec.phase("load arrays into RAM"):
        prepared = PreparedData(workspace_root() / layout.PREPARED_DIR)
        train_images, train_labels = prepared.split("train")
        val_images, val_labels = prepared.split("val")
        train_images = np.asarray(train_images, dtype=np.float32)
        val_images = np.asarray(val_images, dtype=np.float32)
        num_classes = len(prepared.class_names())
    with rec.phase("seed+build+compile"):
        seed_everything(params.train.seed)
        model = build_classifier(params.model, params.data.image_size, num_classes, params.train.seed)
        steps_per_epoch = math.ceil(len(train_labels) / params.train.batch_size)
        model.compile(optimizer=build_optimizer(params.train, steps_per_epoch),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    class_weight = None
    if getattr(params.train, "class_weight", "none") == "balanced":  # as the project's training does
        from tasks.train import balanced_class_weight

        class_weight = balanced_class_weight(train_labels, num_classes)
    with rec.phase("fit"):
        history = model.fit(train_images, train_labels, batch_size=params.train.batch_size, epochs=params.train.epochs,
                            validation_data=(val_images, val_labels), class_weight=class_weight, shuffle=True,
                            verbose=0)
    rec.marks["epochs_run"] = len(history.history["loss"])
    rec.mark("main_end")


def child_floor(args: argparse.Namespace, rec: Recorder) -> None:
    """A bare Prefect flow with one empty task: Prefect's own cost, the floor of any flow."""
    with rec.phase("import prefect (flows.train_pipeline)"):
        from prefect import flow, task
    temporary_server = not os.environ.get("PREFECT_API_URL")
    if temporary_server:
        with rec.phase("prefect: import server module"):
            from prefect.server.api import server as prefect_server
        rec.wrap(prefect_server.SubprocessASGIServer, "start", "prefect: temporary server start")
        rec.wrap(prefect_server.SubprocessASGIServer, "stop", "prefect: temporary server stop (atexit)")

    @task
    def empty_task() -> None:
        rec.mark("task_body_start")

    @flow(name="bench-bare-flow")
    def bare_flow() -> None:
        rec.mark("flow_body_start")
        empty_task()

    rec.mark("flow_call_start")
    bare_flow()
    rec.mark("flow_call_end")
    rec.marks["epochs_run"] = 0
    rec.mark("main_end")


def child_mlflow_floor(args: argparse.Namespace, rec: Recorder) -> None:
    """What any run tracked in MLflow's SQLite store pays, with no project code."""
    with rec.phase("import mlflow (tasks.tracking)"):
        import mlflow
    rec.mark("flow_call_start")
    mlflow.set_tracking_uri(f"sqlite:///{Path(os.environ['CASSAVA_WORKSPACE']) / 'mlflow.db'}")
    mlflow.set_experiment("bench-mlflow-floor")
    with mlflow.start_run():
        mlflow.log_params({f"param_{index}": index for index in range(80)})  # about as many as the project's
        mlflow.log_metric("loss", 1.0, step=1)
    rec.mark("flow_call_end")
    rec.marks["epochs_run"] = 0
    rec.mark("main_end")


def child_flow(args: argparse.Namespace, rec: Recorder) -> None:
    use_prefect = args.child == "flow"
    with rec.phase("import tensorflow+keras"):
        import keras
        import tensorflow  # noqa: F401
    if use_prefect:
        with rec.phase("import prefect (flows.train_pipeline)"):
            import flows.train_pipeline as pipeline
            from prefect import flow
    else:  # the train stage as `python -m tasks.cli train` (dvc repro) runs it: no Prefect
        import tasks.cli as pipeline
    temporary_server = use_prefect and not os.environ.get("PREFECT_API_URL")
    if temporary_server:
        # Prefect imports its server module only to start a temporary server: counted with the start.
        with rec.phase("prefect: import server module"):
            from prefect.server.api import server as prefect_server
    with rec.phase("import mlflow (tasks.tracking)"):
        import mlflow

        import tasks.tracking as tracking
    with rec.phase("import project modules"):
        import tasks.train as train
        from tasks.params import load_params

    # Timers around the project's own functions (and a few library calls), in this process only. Names that
    # a version of the project lacks are skipped (the code evolves; the breakdown shows what exists).
    if temporary_server:
        rec.wrap(prefect_server.SubprocessASGIServer, "start", "prefect: temporary server start")
        rec.wrap(prefect_server.SubprocessASGIServer, "stop", "prefect: temporary server stop (atexit)")
    for name in ("configure_tracking", "ensure_experiment", "reap_orphaned_runs", "lineage_tags", "log_record",
                 "log_keras_model", "log_epoch_metrics", "_tag_data_version", "dvc_data_version", "_log_dataset",
                 "write_pointer", "set_run_tags"):
        rec.wrap(tracking, name, f"tracking.{name}", optional=True)
    for name in ("start_run", "end_run", "log_params", "set_tags", "set_tag"):
        rec.wrap(mlflow, name, f"mlflow.{name}")
    for name in ("train_classifier", "save_training_outputs", "diagnose_initialization", "training_fingerprint",
                 "load_progress"):
        rec.wrap(train, name, f"train.{name}", optional=True)
    if hasattr(train, "Progress"):
        rec.wrap(train.Progress, "save", "train.Progress.save", optional=True)
    try:
        import tasks.diagnostics as diagnostics
    except ImportError:
        diagnostics = None
    if diagnostics is not None:
        rec.wrap(diagnostics, "global_gradient_norm", "diagnostics.global_gradient_norm", optional=True)
    rec.wrap(keras.callbacks.ModelCheckpoint, "_save_model", "keras checkpoint saves", optional=True)
    # Inside MLflow's model logging: the flavor's save, and the serving-input validation (MLflow reloads the
    # logged model as pyfunc and predicts on the input example).
    with rec.phase("import mlflow.keras"):  # normally imported during model logging: counted there
        import mlflow.keras
        import mlflow.models.utils

    rec.wrap(mlflow.keras, "save_model", "mlflow.keras.save_model", optional=True)
    rec.wrap(mlflow.models.utils, "_validate_serving_input", "mlflow serving-input validation", optional=True)
    rec.wrap(keras.callbacks.BackupAndRestore, "_save_model", "keras backup saves", optional=True)
    rec.wrap(keras.Model, "fit", "keras fit")
    # fit runs its validation through Model.evaluate: only evaluations outside fit are counted separately.
    original_fit, original_evaluate = keras.Model.fit, keras.Model.evaluate
    in_fit = [0]

    def fit_flagged(*fit_args: Any, **fit_kwargs: Any) -> Any:
        in_fit[0] += 1
        try:
            return original_fit(*fit_args, **fit_kwargs)
        finally:
            in_fit[0] -= 1

    def evaluate_outside_fit(*eval_args: Any, **eval_kwargs: Any) -> Any:
        if in_fit[0]:
            return original_evaluate(*eval_args, **eval_kwargs)
        with rec.phase("keras evaluate"):
            return original_evaluate(*eval_args, **eval_kwargs)

    keras.Model.fit, keras.Model.evaluate = fit_flagged, evaluate_outside_fit

    original_stage_run = tracking.stage_run

    @contextlib.contextmanager
    def stage_run(*stage_args: Any, **stage_kwargs: Any):
        rec.mark("stage_run_enter")
        with original_stage_run(*stage_args, **stage_kwargs) as run:
            rec.mark("stage_body_start")
            yield run
            rec.mark("stage_body_end")
        rec.mark("stage_run_exit")

    tracking.stage_run = stage_run  # run_train imports it from tasks.tracking when called

    original_stage_entry = pipeline.stage_entry

    def stage_entry(stage: str) -> Callable:
        rec.mark("task_body_start")
        entry = original_stage_entry(stage)

        def entry_timed(*entry_args: Any) -> Any:
            try:
                return entry(*entry_args)
            finally:
                rec.mark("stage_function_end")

        return entry_timed

    pipeline.stage_entry = stage_entry  # run_stage looks it up in its module when the task runs

    fit_timed = keras.Model.fit

    def fit_noting_threads(*fit_args: Any, **fit_kwargs: Any) -> Any:
        import threading

        rec.marks["python_threads_at_fit"] = sorted(thread.name for thread in threading.enumerate())
        return fit_timed(*fit_args, **fit_kwargs)

    keras.Model.fit = fit_noting_threads

    def note_epochs_run() -> None:
        summary = json.loads((Path(os.environ["CASSAVA_WORKSPACE"]) / "models" / "train_summary.json").read_text())
        rec.marks["epochs_run"] = summary["epochs_run"]

    if not use_prefect:
        # The entry itself, as dvc.yaml runs it: `python -m tasks.cli train -S ...` (params, preflight, stage,
        # and its way of exiting). No Prefect: its rows are zero (task_body_start: the stage function entered).
        sys.argv = ["tasks.cli", "train", *[arg for override in training_overrides(args.epochs)
                                            for arg in ("-S", override)]]

        def stage_done() -> None:  # runs before the recorder writes (atexit: last registered, first run)
            rec.marks.setdefault("main_end", rec.marks["stage_function_end"])
            for name in ("flow_call_start", "flow_body_start"):
                rec.marks[name] = rec.marks["entry_start"]  # "flow body: load params" = params and preflight
            rec.marks["task_call_start"] = rec.marks["task_body_start"]
            for name in ("task_call_end", "flow_call_end"):
                rec.marks[name] = rec.marks["stage_function_end"]
            note_epochs_run()

        atexit.register(stage_done)
        rec.mark("entry_start")
        try:
            pipeline.main()
        except SystemExit as ending:  # a version of the entry that exits through the interpreter's teardown
            if ending.code not in (0, None):
                raise
        rec.mark("main_end")
        return

    @flow(name="bench-train-stage", log_prints=True)
    def train_stage_flow(overrides: list[str]) -> str:
        """flows.train_pipeline with the train stage only (data already prepared)."""
        rec.mark("flow_body_start")
        params = load_params(None, overrides)
        pipeline.quiet_libraries()
        rec.mark("task_call_start")
        run_id = pipeline.run_stage("train", params, None)
        rec.mark("task_call_end")
        return run_id

    rec.mark("flow_call_start")
    run_id = train_stage_flow(training_overrides(args.epochs))
    rec.mark("flow_call_end")
    rec.marks["run_id"] = run_id
    note_epochs_run()
    rec.mark("main_end")
    import tasks.errors

    if hasattr(tasks.errors, "exit_without_teardown"):  # as flows.train_pipeline's entry ends
        tasks.errors.exit_without_teardown(0)


def child_main(args: argparse.Namespace) -> None:
    rec = Recorder(Path(args.report))
    common.quiet_tensorflow()
    children = {"plain": child_plain, "floor": child_floor, "mlflow-floor": child_mlflow_floor}
    children.get(args.child, child_flow)(args, rec)  # else "flow" or "stage"


# ----------------------------------------------------------------------------------------------- parent


def start_prefect_server(prefect_home: Path) -> tuple[Any, float]:
    """A temporary Prefect server (what Prefect starts itself when no API URL is set), on 127.0.0.1."""
    os.environ["PREFECT_HOME"] = str(prefect_home)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    started = time.perf_counter()
    server.start(timeout=600)
    return server, time.perf_counter() - started


def run_mode(mode: str, args: argparse.Namespace, workspace: Path, homes: dict[str, Path], api_url: str | None,
             label: str, scratch: Path) -> common.ChildResult:
    report = scratch / f"{label}.json"
    report.unlink(missing_ok=True)
    # Prefect's default (20 s) is too short for its temporary server on a busy 2-core machine: the flow would
    # fail, not just be slow. A longer limit changes no timing, it only lets a slow start finish.
    extra = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    with_server = mode in ("flow-server", "floor-server")
    if with_server:
        extra["PREFECT_API_URL"] = api_url
    env = common.child_env(workspace, homes["flow-server" if with_server else "flow"], **extra)
    child = {"plain": "plain", "stage": "stage", "floor": "floor", "floor-server": "floor",
             "mlflow-floor": "mlflow-floor"}.get(mode, "flow")
    command = [common.PYTHON, str(Path(__file__).resolve()), "--child", child,
               "--epochs", str(args.epochs), "--report", str(report)]
    result = common.run_child(command, env, workspace, scratch / f"{label}.log", report)
    if result.returncode != 0 or not result.report:
        raise RuntimeError(f"{label} failed (exit {result.returncode}); log:\n" + result.log_file.read_text()[-4000:])
    return result


def components(result: common.ChildResult) -> dict[str, float]:
    """Seconds per component of one run (process start/exit from the parent's clock)."""
    report = result.report
    seconds, marks = report["seconds"], report["marks"]
    out: dict[str, float] = {
        "process start (interpreter, site)": report["first_line"] - result.launched_at,
        "import tensorflow+keras": seconds.get("import tensorflow+keras", 0.0),
        "import project modules": seconds.get("import project modules", 0.0),
        # Python joins non-daemon threads, then runs atexit handlers (the recorder's own runs last), then tears
        # the interpreter down (module and TensorFlow finalization).
        "exit: thread joins + atexit handlers": marks["atexit_last"] - marks["main_end"],
        "exit: interpreter teardown": result.exited_at - result.launched_at
        - (report["first_line"] - result.launched_at) - marks["atexit_last"],
    }
    if "fit" in seconds:  # plain
        out["load arrays into RAM"] = seconds["load arrays into RAM"]
        out["seed+build+compile"] = seconds["seed+build+compile"]
        out["fit (training epochs)"] = seconds["fit"]
        return out
    get = lambda key: seconds.get(key, 0.0)  # noqa: E731
    out["exit: thread joins + atexit handlers"] -= get("prefect: temporary server stop (atexit)")
    server_start = get("prefect: temporary server start")
    if "flow_body_start" not in marks:
        out["import mlflow (tasks.tracking)"] = get("import mlflow (tasks.tracking)")  # MLflow's floor
        out["mlflow: run set-up (store, experiment, reap, start_run, tags, params)"] = (
            marks["flow_call_end"] - marks["flow_call_start"])
        return out
    prefect_start = {  # the start of a Prefect flow, the floor's and the project's
        "import prefect (flows.train_pipeline)": get("import prefect (flows.train_pipeline)"),
        "prefect: temporary server start (incl. importing its module)":
            server_start + get("prefect: import server module"),
        "prefect: flow start (run creation, engine; excl. server)":
            marks["flow_body_start"] - marks["flow_call_start"] - server_start,
    }
    if "stage_run_enter" not in marks:  # a floor: Prefect alone
        out.update({
            **prefect_start,
            "prefect: task start": marks["task_body_start"] - marks["flow_body_start"],
            "prefect: task end + flow end": marks["flow_call_end"] - marks["task_body_start"],
            "prefect: temporary server stop (atexit)": get("prefect: temporary server stop (atexit)"),
        })
        return out
    in_fit = {
        "mlflow: per-epoch metric logging (in fit)": get("tracking.log_epoch_metrics"),
        "keras: best-checkpoint saves (in fit)": get("keras checkpoint saves"),
        "keras: per-epoch backups for resume (in fit)": get("keras backup saves") + get("train.Progress.save"),
        "per-epoch gradient-norm probe (in fit)": get("diagnostics.global_gradient_norm"),
    }
    out.update({
        "import prefect (flows.train_pipeline)": prefect_start.pop("import prefect (flows.train_pipeline)"),
        "import mlflow (tasks.tracking)": get("import mlflow (tasks.tracking)"),
        **prefect_start,
        "prefect: task start": marks["task_body_start"] - marks["task_call_start"],
        "prefect: task end + flow end": (marks["task_call_end"] - marks["stage_function_end"])
        + (marks["flow_call_end"] - marks["task_call_end"]),
        "flow body: load params": marks["task_call_start"] - marks["flow_body_start"],
        "task: before stage_run (imports, resume check)": marks["stage_run_enter"] - marks["task_body_start"],
        "mlflow: run set-up (store, experiment, reap, start_run, tags, params)":
            marks["stage_body_start"] - marks["stage_run_enter"],
        "  of which lineage tags (git, versions)": get("tracking.lineage_tags"),
        "train: initialization diagnostics (probe, table, plot)": get("train.diagnose_initialization"),
        "mlflow: extra run tags": get("tracking.set_run_tags"),
        **in_fit,
        "fit (training epochs, minus the rows above marked 'in fit')": get("keras fit") - sum(in_fit.values()),
        "train_classifier rest (load arrays, build, compile, restore best)":
            get("train.train_classifier") - get("keras fit") - get("keras evaluate"),
        "keras: post-fit evaluation of the final model (train+val)": get("keras evaluate"),
        "save outputs (model.keras, history, summary)": get("train.save_training_outputs"),
        "mlflow: artifact + metric logging of the record": get("tracking.log_record") - get("tracking.log_keras_model"),
        "mlflow: model logging (load, predict, signature, save flavor)":
            get("tracking.log_keras_model") + get("import mlflow.keras"),
        "  of which the flavor's save_model": get("mlflow.keras.save_model"),
        "  of which serving-input validation (reload as pyfunc + predict)": get("mlflow serving-input validation"),
        "mlflow: data version (dvc hash) + dataset input": get("tracking._tag_data_version"),
        "mlflow: end_run, pointer, stage tag": marks["stage_run_exit"] - marks["stage_body_end"]
        - get("tracking._tag_data_version"),
        "stage body, other": (marks["stage_body_end"] - marks["stage_body_start"]) - get("train.train_classifier")
        - get("train.save_training_outputs") - get("tracking.log_record") - get("train.diagnose_initialization")
        - get("tracking.set_run_tags"),
        "task: after stage_run (backup clean-up)": marks["stage_function_end"] - marks["stage_run_exit"],
        "prefect: temporary server stop (atexit)": get("prefect: temporary server stop (atexit)"),
    })
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats per mode (default 3; median reported)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs, fixed (default 5)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-warmup", action="store_true", help="skip the (reported, unmeasured) cold first run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace (path is printed)")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--live", action="store_true",
                        help="run the checkout's code as it is on disk instead of a snapshot taken at start")
    parser.add_argument("--from-json", type=Path, help="print the tables of an earlier --json file, run nothing")
    parser.add_argument("--child", choices=("plain", "stage", "flow", "floor", "mlflow-floor"), help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        extra = {key: value for key, value in saved.items()
                 if key in ("machine", "repeats", "prefect_server_first_start_s", "cold_flow")}
        report_results(saved["epochs"], saved["modes"], extra, args.json)
        return 0

    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-overhead-"))
    common.select_code(args.live, scratch)
    info = common.machine_info()
    common.print_machine(info)
    workspace = common.make_workspace("workspace", parent=str(scratch))
    homes = {"flow": scratch / "prefect-home-temporary", "flow-server": scratch / "prefect-home-server"}
    print(f"workspace: {workspace} (CASSAVA_WORKSPACE; PREFECT_HOME under {scratch})")
    prepare_s = common.prepare_data(workspace, log_file=scratch / "prepare.log")
    print(f"data prepared once (acquire + prepare, default params.yaml): {prepare_s:.1f} s")

    server = None
    api_url = None
    extra: dict[str, Any] = {"machine": info, "epochs": args.epochs, "repeats": args.repeats}
    try:
        if {"flow-server", "floor-server"} & set(args.modes):
            server, first_start = start_prefect_server(homes["flow-server"])
            api_url = server.api_url
            extra["prefect_server_first_start_s"] = first_start
            print(f"pre-started temporary Prefect server at {api_url}: {first_start:.2f} s "
                  "(first start in a fresh PREFECT_HOME: creates and migrates its database)")
        if not args.no_warmup and "flow" in args.modes:
            cold = run_mode("flow", args, workspace, homes, api_url, "warmup-flow", scratch)
            extra["cold_flow"] = {"wall_s": cold.wall_s, "cpu_s": cold.cpu_s, "components": components(cold)}
            print(f"cold first flow run (creates mlflow.db and the Prefect database; not in medians): "
                  f"{cold.wall_s:.1f} s wall, server start "
                  f"{cold.report['seconds'].get('prefect: temporary server start', 0):.1f} s")
        elif not args.no_warmup and {"stage", "mlflow-floor"} & set(args.modes):  # mlflow.db created, not measured
            cold = run_mode("stage" if "stage" in args.modes else "mlflow-floor", args, workspace, homes, api_url,
                            "warmup", scratch)
            print(f"cold first run (creates mlflow.db; not in medians): {cold.wall_s:.1f} s wall")
        results: dict[str, list[common.ChildResult]] = {mode: [] for mode in args.modes}
        for repeat in range(args.repeats):
            order = args.modes[repeat % len(args.modes):] + args.modes[: repeat % len(args.modes)]  # rotate
            for mode in order:
                load = os.getloadavg()[0]
                result = run_mode(mode, args, workspace, homes, api_url, f"r{repeat}-{mode}", scratch)
                results[mode].append(result)
                print(f"  repeat {repeat + 1}/{args.repeats} {mode:<11} wall {result.wall_s:6.1f} s  "
                      f"cpu {result.cpu_s:6.1f} s  epochs {result.report['marks']['epochs_run']}  (load {load:.1f})")
    finally:
        if server is not None:
            server.stop()

    runs_by_mode = {mode: [{"wall_s": r.wall_s, "cpu_s": r.cpu_s, "components": components(r),
                            "threads_at_fit": r.report["marks"].get("python_threads_at_fit"),
                            "seconds": r.report["seconds"]} for r in runs]
                    for mode, runs in results.items()}
    report_results(args.epochs, runs_by_mode, extra, args.json)
    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"kept: {scratch}")
    return 0


IN_FIT = ("mlflow: per-epoch metric logging (in fit)", "keras: best-checkpoint saves (in fit)",
          "keras: per-epoch backups for resume (in fit)", "per-epoch gradient-norm probe (in fit)")
FIT_B = "fit (training epochs, minus the rows above marked 'in fit')"
FIT_A = "fit (training epochs)"


def split_overhead(plain: dict[str, Any], orchestrated: dict[str, Any]) -> dict[str, float]:
    """b - a of one repeat, split into: the training epochs themselves (input pipeline, noise), the per-epoch
    extras the project adds inside fit (callbacks), and the rest, the fixed per-run overhead."""
    a, b = plain["components"], orchestrated["components"]
    total = orchestrated["wall_s"] - plain["wall_s"]
    epochs = b[FIT_B] - a[FIT_A]
    per_epoch = sum(b.get(key, 0.0) for key in IN_FIT)
    return {"total": total, "training_epochs": epochs, "per_epoch_extras": per_epoch,
            "fixed": total - epochs - per_epoch}


def report_results(epochs: int, runs_by_mode: dict[str, list[dict[str, Any]]], extra: dict[str, Any],
                   json_file: Path | None) -> None:
    """Print the tables. A run is {"wall_s", "cpu_s", "components"}; the same figures go to json_file."""
    med = common.median
    repeats = max(len(runs) for runs in runs_by_mode.values())
    print(f"\nWhole process, launch to exit ({epochs} epochs; median of {repeats}, range in brackets; CPU = user+sys "
          "of the process and its children, e.g. Prefect's temporary server):")
    rows = []
    for mode, runs in runs_by_mode.items():
        rows.append([mode, med(r["wall_s"] for r in runs), common.spread(r["wall_s"] for r in runs),
                     med(r["cpu_s"] for r in runs), common.spread(r["cpu_s"] for r in runs)])
    print(common.table(rows, ["mode", "wall s", "wall range", "cpu s", "cpu range"]))
    for mode, runs in runs_by_mode.items():
        threads = runs[0].get("threads_at_fit")
        if threads:
            print(f"  {mode}: {len(threads)} Python threads when fit starts: {', '.join(threads)}")

    figures: dict[str, Any] = {**extra, "epochs": epochs, "modes": runs_by_mode}
    plain = runs_by_mode.get("plain")
    for mode in ("stage", "flow", "flow-server"):
        if not plain or mode not in runs_by_mode:
            continue
        runs = runs_by_mode[mode]
        wall_a, wall_b = med(r["wall_s"] for r in plain), med(r["wall_s"] for r in runs)
        cpu_a, cpu_b = med(r["cpu_s"] for r in plain), med(r["cpu_s"] for r in runs)
        splits = [split_overhead(a, b) for a, b in zip(plain, runs)]
        split = {key: med(s[key] for s in splits) for key in splits[0]}
        print(f"\n{mode} vs plain: wall ratio b/a = {wall_b / wall_a:.2f}, b - a = {wall_b - wall_a:.1f} s "
              f"(medians; paired per repeat {split['total']:.1f} s); CPU ratio {cpu_b / cpu_a:.2f}, "
              f"b - a = {cpu_b - cpu_a:.1f} CPU s")
        floors = {floor: med(r["wall_s"] for r in runs_by_mode[floor]) for floor in FLOORS[mode] if floor in runs_by_mode}
        target, target_text = TARGETS[mode], f"{TARGETS[mode]:g} s"
        if mode == "flow":  # Prefect's own floor (its temporary server) + 4 s; unknown without the floor
            target = floors["floor"] + TARGETS[mode] if "floor" in floors else math.nan
            target_text = (f"Prefect's floor {floors['floor']:.1f} s + {TARGETS[mode]:g} s" if "floor" in floors
                           else "needs the floor mode")
        print(f"  b - a per repeat = training epochs themselves {split['training_epochs']:+.1f} s (input pipeline, "
              f"load) + per-epoch extras inside fit {split['per_epoch_extras']:+.1f} s + FIXED per-run overhead "
              f"{split['fixed']:+.1f} s (medians over repeats; target: fixed <= {target_text}: "
              f"{'met' if split['fixed'] <= target else 'NOT met'})")
        for floor, floor_s in floors.items():
            print(f"  bare baseline {floor} ({'Prefect' if floor.startswith('floor') else 'MLflow'}'s own cost, "
                  f"launch to exit, no project code): {floor_s:.1f} s")
        figures[f"{mode}_vs_plain"] = {"wall_ratio": wall_b / wall_a, "wall_overhead_s": wall_b - wall_a,
                                      "cpu_ratio": cpu_b / cpu_a, "cpu_overhead_s": cpu_b - cpu_a, **split,
                                      "per_repeat": splits, "target_fixed_s": target, "floors_wall_s": floors}
        figures[f"{mode}_breakdown"] = breakdown(plain, runs, mode)
    if json_file:
        json_file.write_text(json.dumps(figures, indent=1, default=str))
        print(f"\nfigures written to {json_file}")


def breakdown(plain: list[dict[str, Any]], orchestrated: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Component table: median seconds per component, plain vs orchestrated, and what it adds."""
    med = common.median
    a = [run["components"] for run in plain]
    b = [run["components"] for run in orchestrated]
    shared = {  # the plain run's counterpart of an orchestrated component
        "process start (interpreter, site)": "process start (interpreter, site)",
        "import tensorflow+keras": "import tensorflow+keras",
        "import project modules": "import project modules",
        FIT_B: FIT_A,
        "train_classifier rest (load arrays, build, compile, restore best)": None,
        "exit: thread joins + atexit handlers": "exit: thread joins + atexit handlers",
        "exit: interpreter teardown": "exit: interpreter teardown",
    }
    rows = []
    for key in b[0]:
        b_value = med(run[key] for run in b)
        if key in shared:
            if shared[key] is None:
                a_value = med(run["load arrays into RAM"] + run["seed+build+compile"] for run in a)
            else:
                a_value = med(run[shared[key]] for run in a)
        else:
            a_value = 0.0
        kind = "epochs" if key == FIT_B else "per-epoch" if key in IN_FIT else "" if key.startswith("  ") else "fixed"
        rows.append([key, kind, a_value, b_value, b_value - a_value])
    # Residual: whole-process difference not covered by the components (per repeat, then median).
    residuals = []
    for run_a, run_b, ca, cb in zip(plain, orchestrated, a, b):
        covered_b = sum(value for key, value in cb.items() if not key.startswith("  "))
        residuals.append((run_b["wall_s"] - covered_b) - (run_a["wall_s"] - sum(ca.values())))
    rows.append(["unattributed (whole-process difference not covered above)", "fixed", 0.0, med(residuals),
                 med(residuals)])
    print(f"\nWhere the {mode} run's time goes (median seconds per component over repeats; '+' = orchestrated - "
          "plain; rows starting with two spaces are part of the row above; medians do not add up exactly):")
    print(common.table(rows, ["component", "kind", "plain", mode, "+"]))
    return [{"component": r[0], "kind": r[1], "plain_s": r[2], "orchestrated_s": r[3], "added_s": r[4]} for r in rows]


if __name__ == "__main__":
    sys.exit(main())
