"""Start-up of the command line: `python -m tasks.cli --help`, `check-params` and a rejected param, against
the bare interpreter and against importing the heavy libraries, in one run.

Each command runs in a fresh process, timed from launch to exit (wall and CPU). The commands are
interleaved, their order rotated every repeat. Once per command, a probe run lists which of TensorFlow,
Keras, MLflow and Prefect the command imported (by `sys.modules`; `tests/tasks/test_params.py` asserts
the same). Target (issue 11): each project command <= 1 s with none of them imported.

    .venv/bin/python bench/cli_startup.py [--repeats 3] [--json FILE] [--live]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common  # noqa: E402

HEAVY = ("tensorflow", "keras", "mlflow", "prefect")
TARGET_S = 1.0
# name -> (arguments of `python`, whether it is a project command held to the target)
COMMANDS: dict[str, tuple[list[str], bool]] = {
    "python -c pass (interpreter floor)": (["-c", "pass"], False),
    "tasks.cli --help": (["-m", "tasks.cli", "--help"], True),
    "tasks.cli check-params": (["-m", "tasks.cli", "check-params"], True),
    "tasks.cli check-params -S train.optimizer=adagrad (rejected)":
        (["-m", "tasks.cli", "check-params", "-S", "train.optimizer=adagrad"], True),
    "tasks.cli train -S model.initializer=bogus (rejected)":
        (["-m", "tasks.cli", "train", "-S", "model.initializer=bogus"], True),
    "import tensorflow, keras, mlflow, prefect (what is avoided)":
        (["-c", "import tensorflow, keras, mlflow, prefect"], False),
}


def heavy_modules_imported(arguments: list[str], env: dict[str, str], cwd: Path) -> list[str]:
    """Which heavy libraries the command had imported when it exited (run once more through runpy)."""
    if arguments[0] != "-m":
        return sorted(name for name in HEAVY if name in arguments[1])
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{arguments[1]!r}, *{arguments[2:]!r}]\n"
        "try:\n"
        f"    runpy.run_module({arguments[1]!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print('HEAVY', ','.join(sorted(name for name in {HEAVY!r} if name in sys.modules)))\n"
    )
    result = subprocess.run([common.PYTHON, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=600)
    line = next(line for line in result.stdout.splitlines() if line.startswith("HEAVY"))
    return [name for name in line.removeprefix("HEAVY").strip().split(",") if name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs per command (default 3; median reported)")
    parser.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    parser.add_argument("--live", action="store_true", help="run the checkout as it is instead of a snapshot")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (path is printed)")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cassava-bench-cli-"))
    code = common.select_code(args.live, scratch)
    info = common.machine_info()
    common.print_machine(info)
    workspace = common.make_workspace("workspace", parent=str(scratch))
    env = common.child_env(workspace)
    names = list(COMMANDS)
    runs: dict[str, list[common.ChildResult]] = {name: [] for name in names}
    loads = []
    for repeat in range(args.repeats):
        loads.append(os.getloadavg()[0])
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            arguments, _ = COMMANDS[name]
            runs[name].append(common.run_child([common.PYTHON, *arguments], env, code,
                                               scratch / f"r{repeat}-{len(runs[name])}.log"))
    heavy = {name: heavy_modules_imported(COMMANDS[name][0], env, code) for name in names}

    rows, figures = [], {}
    for name in names:
        wall = common.median(run.wall_s for run in runs[name])
        cpu = common.median(run.cpu_s for run in runs[name])
        held = COMMANDS[name][1]
        verdict = ("met" if wall <= TARGET_S and not heavy[name] else "NOT met") if held else ""
        rows.append([name, wall, common.spread(run.wall_s for run in runs[name]), cpu,
                     ", ".join(heavy[name]) or "none", verdict])
        figures[name] = {"wall_s": [run.wall_s for run in runs[name]], "cpu_s": [run.cpu_s for run in runs[name]],
                         "exit_codes": [run.returncode for run in runs[name]], "heavy_imported": heavy[name]}
    print(f"\nLaunch to exit, median of {args.repeats} (load {min(loads):.1f}-{max(loads):.1f}); target for the "
          f"project's commands: <= {TARGET_S:g} s with none of {', '.join(HEAVY)} imported")
    print(common.table(rows, ["command", "wall s", "wall range", "cpu s", "heavy modules imported", "target"]))
    common.finish({"machine": info, "repeats": args.repeats, "loadavg": loads, "commands": figures},
                  args.json, scratch, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
