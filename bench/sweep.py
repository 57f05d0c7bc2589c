"""Speed-up of a sweep on Dask: the same 4 points with 2 local workers vs. 1 worker (sequential), in one run.

Each mode runs `python -m flows.sweep -S train.learning_rate=0.001,0.01 -S model.dropout=0,0.3 --workers N`
as a user runs it, in its own fresh workspace (data prepared by the sweep itself) with a temporary
PREFECT_HOME, and is timed from launch to exit. The points phase (first child run's start to the last one's
end, from MLflow) is reported too: it excludes the fixed costs (Prefect server, data preparation, cluster
start-up) that parallel workers cannot shrink.

    .venv/bin/python bench/sweep.py                       # 1 repeat of each mode, tiny data, 5 epochs
    .venv/bin/python bench/sweep.py --repeats 2 --json bench/results/sweep.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

POINTS = ["train.learning_rate=0.001,0.01", "model.dropout=0,0.3"]
# Small enough for 8 trainings in minutes on 2 loaded cores, big enough that training dominates a point.
FIXED = ["data.synthetic.images_per_class=40", "data.synthetic.render_size=48", "data.image_size=32",
         "data.min_images_per_class=6", "model.conv_filters=[8, 16]", "model.dense_units=16", "train.epochs=5",
         "train.early_stopping.enabled=false", "train.batch_size=16", "evaluate.batch_size=32", "registry.enabled=false"]
TARGET = 1.5


def points_phase(workspace: Path) -> dict[str, Any]:
    """First child start to last child end (seconds), and the children's own durations, from MLflow."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cassava-synthetic")
    children = client.search_runs([experiment.experiment_id], filter_string="tags.`cassava.sweep.role` = 'child'")
    starts = [child.info.start_time for child in children]
    ends = [child.info.end_time for child in children]
    return {"children": len(children), "finished": sum(child.info.status == "FINISHED" for child in children),
            "points_phase_s": (max(ends) - min(starts)) / 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--live", action="store_true", help="run the checkout, not a snapshot of it")
    parser.add_argument("--keep", action="store_true", help="keep the workspaces")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-sweep-"))
    common.select_code(args.live, scratch)
    info = common.machine_info()
    common.print_machine(info)
    modes = {"sequential (1 worker)": 1, "parallel (2 workers)": 2}
    figures: dict[str, Any] = {"machine": info, "points": POINTS, "fixed": FIXED, "runs": []}
    for repeat in range(args.repeats):
        order = list(modes.items()) if repeat % 2 == 0 else list(reversed(modes.items()))
        for mode, workers in order:
            workspace = common.make_workspace(f"w{workers}", str(scratch))
            prefect_home = Path(tempfile.mkdtemp(prefix="prefect-", dir=scratch))
            env = common.child_env(workspace, prefect_home, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600",
                                   TQDM_DISABLE="1")
            command = [common.PYTHON, "-m", "flows.sweep", *(arg for axis in [*POINTS, *FIXED] for arg in ("-S", axis)),
                       "--workers", str(workers)]
            load = os.getloadavg()[0]
            result = common.run_child(command, env, common.CODE, scratch / f"{workers}-{repeat}.log")
            if result.returncode != 0:
                print(result.log_file.read_text()[-4000:])
                raise SystemExit(f"{mode} failed with exit code {result.returncode}; log {result.log_file}")
            run = {"mode": mode, "workers": workers, "wall_s": result.wall_s, "cpu_s": result.cpu_s, "load": load,
                   "load_after": os.getloadavg()[0], **points_phase(workspace)}
            figures["runs"].append(run)
            print(f"  {mode:22s} wall {run['wall_s']:6.1f} s  points {run['points_phase_s']:6.1f} s  "
                  f"cpu {run['cpu_s']:6.1f} s  children finished {run['finished']}/4  (load {load:.1f})", flush=True)

    med = common.median
    rows, by_mode = [], {}
    for mode, workers in modes.items():
        runs = [run for run in figures["runs"] if run["workers"] == workers]
        by_mode[workers] = {key: med(run[key] for run in runs) for key in ("wall_s", "points_phase_s", "cpu_s")}
        rows.append([mode, by_mode[workers]["wall_s"], by_mode[workers]["points_phase_s"], by_mode[workers]["cpu_s"]])
    print("\n" + common.table(rows, ["mode", "wall s", "points phase s", "CPU s"]))
    figures["speedup_wall"] = by_mode[1]["wall_s"] / by_mode[2]["wall_s"]
    figures["speedup_points"] = by_mode[1]["points_phase_s"] / by_mode[2]["points_phase_s"]
    print(f"speed-up 2 workers vs 1: {figures['speedup_wall']:.2f}x wall, {figures['speedup_points']:.2f}x points "
          f"phase (target >= {TARGET}x)")
    common.finish(figures, args.json, scratch, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
