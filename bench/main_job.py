"""Wall time of the main job, `python -m flows.train_pipeline`, exactly as a user runs it, in a temp workspace.

Equivalent to

    cd /work/main && time CASSAVA_WORKSPACE=<fresh temp dir with params.yaml> .venv/bin/python -m flows.train_pipeline

with MLFLOW_TRACKING_URI / DVC_ROOT / PREFECT_API_URL unset (so Prefect starts its temporary server, as it
does for a user with no server). Each repeat gets a fresh workspace (acquire renders the synthetic data,
mlflow.db is created: a first run of a fresh checkout). PREFECT_HOME is a temporary folder whose database is
created once before the repeats (that one-time cost is reported separately), so the user's ~/.prefect is
never touched. Per-stage times are read from the timestamps of Prefect's own log lines.

    .venv/bin/python bench/main_job.py                  # 3 repeats, params.yaml as committed
    .venv/bin/python bench/main_job.py --repeats 1 -S train.epochs=5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The project code: the snapshot a parent benchmark hands its children, else this checkout.
sys.path.insert(1, os.environ.get("CASSAVA_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

import _common as common  # noqa: E402

TARGET_S = 300.0
LINE = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| (\w+)\s*\| (.*)$")


def prefect_events(log_text: str, launched_at: float, exited_at: float) -> dict[str, float]:
    """Seconds since process launch of: server start, flow begin, each task's end, flow end (Prefect's log
    lines carry local wall-clock times of day, aligned here with the parent's launch and exit times)."""
    launch = datetime.fromtimestamp(launched_at)
    midnight = launch.replace(hour=0, minute=0, second=0, microsecond=0)
    events: dict[str, float] = {"exit": exited_at - launched_at}
    for line in log_text.splitlines():
        match = LINE.match(line)
        if not match:
            continue
        clock = datetime.strptime(match.group(1), "%H:%M:%S.%f")
        stamp = midnight + timedelta(hours=clock.hour, minutes=clock.minute, seconds=clock.second,
                                     microseconds=clock.microsecond)
        if stamp < launch - timedelta(hours=12):  # the run went past midnight
            stamp += timedelta(days=1)
        seconds = (stamp - launch).total_seconds()
        message = match.group(3)
        if "Starting temporary server" in message:
            events.setdefault("server_start_logged", seconds)
        elif "Beginning flow run" in message:
            events.setdefault("flow_begin", seconds)
        elif message.startswith("Task run") and "Finished in state" in message:
            task = re.search(r"Task run '([^']+)'", message).group(1)
            events[f"task_end:{task}"] = seconds
        elif message.startswith("Flow run") and "Finished in state" in message:
            events["flow_end"] = seconds
    return events


def stage_seconds(events: dict[str, float]) -> dict[str, float]:
    """Durations between consecutive milestones (a task's time = from the previous milestone to its end)."""
    out: dict[str, float] = {}
    if "server_start_logged" in events:
        out["process start, imports (to 'Starting temporary server')"] = events["server_start_logged"]
    if "flow_begin" in events:
        out["prefect temporary server start + flow run start"] = events["flow_begin"] - events.get("server_start_logged", 0.0)
    last = events.get("flow_begin")
    for key, value in events.items():
        if key.startswith("task_end:") and last is not None:
            out[f"stage {key.split(':', 1)[1]}"] = value - last
            last = value
    if "flow_end" in events and last is not None:
        out["flow end"] = events["flow_end"] - last
        out["after the flow (summary print, server stop, exit)"] = events["exit"] - events["flow_end"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs (default 3; median reported)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        help="override passed on to the flow, section.key=value (repeatable)")
    parser.add_argument("--user-prefect-home", action="store_true",
                        help="use the default PREFECT_HOME (~/.prefect) instead of a temporary one")
    parser.add_argument("--prefect-default-startup-timeout", action="store_true",
                        help="keep Prefect's 20 s limit for its temporary server start (default: raised to 600 s, "
                             "because a busy 2-core machine can exceed 20 s and the run would fail)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspaces")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--live", action="store_true",
                        help="run the checkout's code as it is on disk instead of a snapshot taken at start")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-main-job-"))
    code = common.select_code(args.live, scratch)
    info = common.machine_info()
    common.print_machine(info)
    prefect_home = None if args.user_prefect_home else scratch / "prefect-home"
    extra_env = {} if args.prefect_default_startup_timeout else {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}
    figures: dict[str, Any] = {"machine": info, "overrides": args.overrides, "runs": []}

    if prefect_home is not None:
        # One-time: create and migrate the Prefect database, as a user's very first run does.
        init_code = ("from prefect.server.api.server import SubprocessASGIServer as S\n"
                "import time; s = S(); t = time.perf_counter(); s.start(timeout=600)\n"
                "print(f'started in {time.perf_counter() - t:.2f} s'); s.stop()\n")
        env = common.child_env(scratch, prefect_home, PREFECT_SERVER_ANALYTICS_ENABLED="false")
        first = common.run_child([common.PYTHON, "-c", init_code], env, scratch, scratch / "prefect-db-init.log")
        figures["prefect_db_init_s"] = first.wall_s
        print(f"one-time Prefect database creation (fresh PREFECT_HOME, temporary server started and stopped): "
              f"{first.wall_s:.1f} s wall, not included below")

    command = [common.PYTHON, "-m", "flows.train_pipeline", *[item for o in args.overrides for item in ("-S", o)]]
    print(f"command (cwd {code}): CASSAVA_WORKSPACE=<fresh temp workspace> {' '.join(command)}")
    runs = []
    for repeat in range(args.repeats):
        workspace = common.make_workspace(f"main-job-r{repeat}", parent=str(scratch))
        env = common.child_env(workspace, prefect_home, **extra_env)
        if prefect_home is None:
            env.pop("PREFECT_HOME", None)
        guard = common.REPO / "mlflow.db"
        guard_before = guard.stat().st_mtime if guard.exists() else None
        load = os.getloadavg()[0]
        result = common.run_child(command, env, code, scratch / f"r{repeat}.log")
        log_text = result.log_file.read_text(errors="replace")
        if result.returncode != 0:
            print(log_text[-4000:])
            raise SystemExit(f"run {repeat + 1} failed with exit code {result.returncode}; log {result.log_file}")
        if not (workspace / "reports" / "metrics.json").exists() or not (workspace / "mlflow.db").exists():
            raise SystemExit(f"run {repeat + 1}: outputs not in the workspace {workspace}: CASSAVA_WORKSPACE ignored?")
        if guard_before is not None and guard.stat().st_mtime != guard_before:
            print(f"  warning: {guard} changed during the run (another user of the checkout, or this run)")
        summary_file = workspace / "models" / "train_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        metrics = json.loads((workspace / "reports" / "metrics.json").read_text())
        stages = stage_seconds(prefect_events(log_text, result.launched_at, result.exited_at))
        run = {"wall_s": result.wall_s, "cpu_s": result.cpu_s, "load": load, "epochs_run": summary.get("epochs_run"),
               "stopped_epoch": summary.get("stopped_epoch"), "train_seconds": summary.get("seconds"),
               "test_accuracy": metrics.get("test_accuracy"), "stages": stages}
        runs.append(run)
        figures["runs"].append(run)
        print(f"  run {repeat + 1}/{args.repeats}: wall {result.wall_s:6.1f} s  cpu {result.cpu_s:6.1f} s  "
              f"epochs {run['epochs_run']}  test accuracy {run['test_accuracy']:.3f}  (load {load:.1f})")
        if not args.keep:
            shutil.rmtree(workspace, ignore_errors=True)

    med = common.median
    wall = med(r["wall_s"] for r in runs)
    print(f"\nmain job, median of {args.repeats}: {wall:.1f} s wall ({common.spread(r['wall_s'] for r in runs)}), "
          f"{med(r['cpu_s'] for r in runs):.1f} s CPU; target < {TARGET_S:.0f} s: {'met' if wall < TARGET_S else 'NOT met'}")
    keys = list(dict.fromkeys(key for r in runs for key in r["stages"]))
    rows = [[key, med(r["stages"].get(key) for r in runs), common.spread(r["stages"].get(key) for r in runs)]
            for key in keys]
    rows.append(["(training fit itself, train_summary.seconds)", med(r["train_seconds"] for r in runs),
                 common.spread(r["train_seconds"] for r in runs)])
    print("per stage, from Prefect's log timestamps (median s):")
    print(common.table(rows, ["part", "seconds", "range"]))
    figures["median_wall_s"] = wall
    common.finish(figures, args.json, scratch, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
