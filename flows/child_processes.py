"""Servers we start never outlive the process that started them, whatever kills it (SIGKILL included).

Each server runs under a small *guard* process (`python -m flows.child_processes <parent pid> -- command...`),
started in its own session, so a Ctrl-C in the terminal reaches our process first and it stops its servers in
order. The guard leads the server's process group: it runs the command in that group, and when its parent
dies, or it is asked to stop (SIGTERM), it stops the whole group (SIGTERM, then SIGKILL after a grace
period), so the server's own children (uvicorn workers, MLflow's gunicorn/uvicorn) go too.

The guard notices its parent's death by polling `getppid()` twice a second rather than through
PR_SET_PDEATHSIG: the kernel sends that signal when the *thread* that started the child exits, which would
kill a server started from a worker thread that finishes while the process lives on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator, Sequence

POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the caller retries if it is taken meanwhile)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_guarded(command: Sequence[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """Start `command` under a guard tied to this process; its output goes to `log_file`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.child_processes", str(os.getpid()), "--", *command],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,  # so `-m flows.child_processes` imports from this checkout
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: Ctrl-C in the terminal does not reach it directly
        )


def stop_guarded(guard: subprocess.Popen[bytes], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop a guarded command and everything it started; returns when the whole group is gone."""
    if guard.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            guard.send_signal(signal.SIGTERM)  # the guard stops its group, then exits
        try:
            guard.wait(grace + 10)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(guard.pid)  # anything left (a guard that could not finish its job)
    with contextlib.suppress(subprocess.TimeoutExpired):
        guard.wait(10)


def group_alive(pgid: int) -> bool:
    """Whether any process of this process group still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def exit_with_parent(grace: float = STOP_GRACE_SECONDS) -> None:
    """Make this process end when its parent dies (SIGTERM to itself, then SIGKILL after `grace` seconds).

    For processes started by code we do not control, such as the flow-run processes Prefect's runner spawns
    under `flows.platform`: a daemon thread watches `getppid()`.
    """
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)  # ends the stage's MLflow run KILLED (see tasks.tracking)
        time.sleep(grace)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _guard(parent: int, command: list[str], out: IO[str]) -> int:
    """Run `command` in this (the guard's) process group until it exits, the parent dies, or we are stopped."""
    if os.getppid() != parent:
        return 1  # the parent died before we started
    stop_requested: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda received, frame: stop_requested.append(received))
    child = subprocess.Popen(command)
    while child.poll() is None and not stop_requested and os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    if child.poll() is not None and not stop_requested and os.getppid() == parent:
        _stop_group(grace=2.0)  # the command ended: leave none of its children behind
        return child.returncode
    reason = f"signal {stop_requested[0]}" if stop_requested else f"parent {parent} died"
    print(f"guard: stopping {command[0]} and its children ({reason})", file=out, flush=True)
    _stop_group(STOP_GRACE_SECONDS, child)
    return 0


def _stop_group(grace: float, child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM every other process of our group, wait up to `grace`, then SIGKILL the rest (and ourselves)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # killpg below reaches the guard too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _others_in_group():
        if child is not None:
            child.poll()  # reap it, so it does not linger as a zombie of our group
        time.sleep(0.2)
    if _others_in_group():
        os.killpg(0, signal.SIGKILL)  # kills the guard as well: nothing of the group survives


def _others_in_group() -> bool:
    import psutil

    me = os.getpid()
    group = os.getpgid(0)
    for process in psutil.process_iter(["pid", "status"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if process.pid != me and process.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(process.pid) == group:
                return True
    return False


if __name__ == "__main__":
    # python -m flows.child_processes <parent pid> -- command ...
    parent_pid, separator, *guarded = sys.argv[1:]
    assert separator == "--" and guarded, "usage: python -m flows.child_processes <parent pid> -- command ..."
    sys.exit(_guard(int(parent_pid), guarded, sys.stdout))
