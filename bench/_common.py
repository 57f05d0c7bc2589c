"""Shared helpers of the benchmarks: throw-away workspaces, a clean child environment, timing of child
processes (wall and CPU time), machine description and small tables.

Nothing here writes inside the repository: every workspace is a fresh temporary folder (params.yaml copied
in), handed to the project through CASSAVA_WORKSPACE.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# The project code the benchmarks run: REPO itself (--live) or, by default, a snapshot of it taken at start
# (other people edit the checkout while a benchmark runs; a snapshot keeps every repeat on the same code).
CODE = REPO
SNAPSHOT_IGNORE = (".venv", "data", "models", "mlruns", "mlartifacts", "mlflow.db", "mlflow.db-journal", "reports",
                   "cache", "tmp", ".pytest_cache", "__pycache__", "bench", ".prefect", ".bench", "*.pyc")
# Variables that would point the project somewhere else than the benchmark's workspace.
UNSET = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "PREFECT_API_URL", "CASSAVA_WORKSPACE")


def select_code(live: bool, parent: Path) -> Path:
    """Run the checkout itself (live) or a snapshot of its working tree (code, params.yaml, .git; no data,
    models, tracking stores, caches or virtualenv) copied under `parent`. Sets CODE and sys.path."""
    global CODE
    if live:
        CODE = REPO
    else:
        CODE = parent / "code"
        shutil.copytree(REPO, CODE, ignore=shutil.ignore_patterns(*SNAPSHOT_IGNORE), symlinks=True)
    sys.path.insert(0, str(CODE))
    return CODE


def make_workspace(prefix: str, parent: str | None = None) -> Path:
    """A new empty workspace holding a copy of the measured code's params.yaml."""
    root = Path(tempfile.mkdtemp(prefix=f"cassava-bench-{prefix}-", dir=parent))
    shutil.copy2(CODE / "params.yaml", root / "params.yaml")
    return root


def child_env(workspace: Path, prefect_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked child: this one minus anything pointing elsewhere, plus the workspace."""
    env = {key: value for key, value in os.environ.items() if key not in UNSET}
    env["CASSAVA_WORKSPACE"] = str(workspace)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CODE), env.get("PYTHONPATH")]))
    env["CASSAVA_BENCH_CODE"] = str(CODE)  # for the benchmark's own child processes
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    env.update(extra)
    return env


@dataclass
class ChildResult:
    returncode: int
    wall_s: float  # launch → exit, measured by the parent
    cpu_s: float  # user + system time of the child and every descendant it reaped (e.g. Prefect's server)
    launched_at: float  # time.time() at launch (to align with timestamps the child reports)
    exited_at: float
    log_file: Path
    report: dict[str, Any] = field(default_factory=dict)  # JSON the child wrote, if any


def run_child(command: Sequence[str], env: dict[str, str], cwd: Path, log_file: Path,
              report_file: Path | None = None, timeout_s: float = 3600) -> ChildResult:
    """Run a command to completion; wall time and CPU time (via wait4, descendants included)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("w") as log:
        launched = time.time()
        started = time.perf_counter()
        process = subprocess.Popen(list(command), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        exited = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    report: dict[str, Any] = {}
    if report_file is not None and report_file.exists():
        report = json.loads(report_file.read_text())
    return ChildResult(process.returncode, wall, usage.ru_utime + usage.ru_stime, launched, exited, log_file, report)


def prepare_data(workspace: Path, overrides: Sequence[str] = (), log_file: Path | None = None) -> float:
    """Acquire + prepare the data of `workspace` (no MLflow, no Prefect) in a child process; seconds taken."""
    code = (
        "from tasks.params import load_params, workspace_root\n"
        "from tasks.data import acquire, prepare_dataset\n"
        "from tasks import layout\n"
        f"params = load_params(None, {list(overrides)!r})\n"
        "root = workspace_root()\n"
        "acquire(params.data, root / layout.RAW_DIR)\n"
        "prepare_dataset(params.data, root / layout.RAW_DIR, root / layout.PREPARED_DIR)\n"
    )
    log_file = log_file or workspace / "prepare.log"
    result = run_child([PYTHON, "-c", code], child_env(workspace, TQDM_DISABLE="1"), workspace, log_file)
    if result.returncode != 0:
        raise RuntimeError(f"data preparation failed (exit {result.returncode}); see {log_file}:\n"
                           + log_file.read_text()[-3000:])
    return result.wall_s


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(*names: str) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def git_state() -> str:
    """The commit measured and how many tracked files differ from it (read-only git commands)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return f"{commit}" + (f" + {len(changed)} modified tracked file(s)" if changed else "")


def machine_info() -> dict[str, Any]:
    return {
        "git": git_state(),
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        **versions("tensorflow", "tensorflow-cpu", "keras", "mlflow", "prefect", "numpy"),
    }


def print_machine(info: dict[str, Any]) -> None:
    load = ", ".join(f"{value:.2f}" for value in info["loadavg_at_start"])
    libs = ", ".join(f"{key} {info[key]}" for key in ("tensorflow", "tensorflow-cpu", "keras", "mlflow", "prefect")
                     if key in info)
    print(f"machine: {info['nproc']} CPUs ({info['affinity']} usable), {info['cpu']}; python {info['python']}; {libs}")
    print(f"load average at start: {load} (other jobs share this machine: medians of repeats are reported)")
    print(f"project code measured: {info['git']}" + ("" if CODE == REPO else f", snapshot of the working tree at {CODE}"))


def median(values: Iterable[float]) -> float:
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else float("nan")


def spread(values: Iterable[float]) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "-"
    return f"{min(values):.2f}..{max(values):.2f}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(cell) for cell in header]] + [[_cell(cell) for cell in row] for row in rows]
    widths = [max(len(row[index]) for row in cells) for index in range(len(header))]
    lines = []
    for number, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                               for index, (cell, width) in enumerate(zip(row, widths))))
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.2f}"
    return str(value)


def quiet_tensorflow() -> None:
    """TF_CPP_MIN_LOG_LEVEL before TensorFlow is imported; Python-level TF/absl logging at ERROR."""
    import logging
    import warnings

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for noisy in ("tensorflow", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="keras")


def finish(figures: dict[str, Any], json_file: Path | None, scratch: Path, keep: bool) -> None:
    """Write the raw figures if asked, then remove the scratch folder unless --keep."""
    if json_file:
        json_file.write_text(json.dumps(figures, indent=1, default=str))
        print(f"\nfigures written to {json_file}")
    if keep:
        print(f"kept: {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def add_output_options(parser: Any, keep_help: str = "keep the temporary workspace") -> None:
    """--keep, --json and --live, as every benchmark takes them."""
    parser.add_argument("--keep", action="store_true", help=keep_help)
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--live", action="store_true",
                        help="run the checkout's code as it is on disk instead of a snapshot taken at start")
