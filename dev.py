#!/usr/bin/env python3
"""The project's two front-door commands, runnable with nothing but Python 3.11:

    python3 dev.py run  [-S section.key=value ...]   # set up .venv if needed, run the pipeline once (Prefect)
    python3 dev.py test [pytest args ...]            # set up .venv if needed, run the whole test suite
    python3 dev.py platform [--prefect-port N ...]   # Prefect server + MLflow UI + scheduled retraining (Ctrl-C stops)

Set-up is idempotent: `.venv` is created once and re-installed only when requirements.lock changes (its
hash is stamped inside the venv). Installation uses uv (pinned, installed into the venv by pip) because it
installs the locked set in seconds rather than minutes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.lock"
STAMP = VENV / ".requirements.lock.sha256"
UV_VERSION = "0.13.9"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_environment() -> None:
    """Create .venv and install the locked dependencies, unless they are already there."""
    if sys.version_info[:2] != (3, 11):
        print(f"warning: the lock targets Python 3.11; this is {sys.version.split()[0]}", file=sys.stderr)
    wanted = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    if venv_python().exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not venv_python().exists():
        print("setup: creating .venv", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("setup: installing the locked dependencies (first time: a few minutes)", file=sys.stderr)
    run([str(venv_python()), "-m", "pip", "install", "--quiet", f"uv=={UV_VERSION}"])
    # Compiled once here: uv does not compile by default, and every later process would pay seconds for it.
    run([str(VENV / "bin" / "uv"), "pip", "install", "--compile-bytecode", "--python", str(venv_python()), "-r", str(LOCK)])
    STAMP.write_text(wanted + "\n")


def run(command: list[str]) -> None:
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode != 0:
        sys.exit(completed.returncode)


def exec_in_venv(arguments: list[str]) -> None:
    """Replace this process with one that runs in the venv (its bin/ first on PATH, as `activate` does)."""
    environment = dict(os.environ, VIRTUAL_ENV=str(VENV), PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    os.chdir(ROOT)
    os.execve(str(venv_python()), [str(venv_python()), *arguments], environment)


def main(argv: list[str]) -> None:
    commands = {
        "run": ["-m", "flows.train_pipeline"],
        "test": ["-m", "pytest"],
        "platform": ["-m", "flows.platform"],
        "setup": None,
    }
    if not argv or argv[0] not in commands:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    ensure_environment()
    prefix = commands[argv[0]]
    if prefix is not None:
        exec_in_venv([*prefix, *argv[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
