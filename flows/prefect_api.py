"""Which Prefect API an entry uses, and a private server when none is running.

Every entry (`dev.py run`, `python -m flows.train_pipeline`, the sweep) runs inside `prefect_api()`, which
picks, in this order, and says which in one line ("Prefect: using the server at <url> (...)"):

1. the server named by `PREFECT_API_URL` (environment or Prefect profile), if it answers; if it does not,
   the entry stops with one line naming it (the user asked for that server);
2. the platform's server (`python -m flows.platform`), recorded in `<workspace>/.prefect/platform.json`,
   if its process is alive and it answers;
3. otherwise a private server for this run only: `uvicorn` serving Prefect's app on a free 127.0.0.1 port,
   with its own PREFECT_HOME in a temporary folder (runs started together never share a database),
   a database copied from a migrated template (migrating a fresh one takes 5 to 15 s), and no start-up
   deadline: we poll its health while its process lives, so a loaded machine only makes it slower. It runs
   under a guard (`flows.child_processes`), so it stops with the run even when the run is SIGKILLed.

Prefect's own temporary server is not used: it gives up after 20 s and outlives a SIGKILLed parent.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from flows.child_processes import free_port, start_guarded, stop_guarded
from tasks.errors import UserError

PLATFORM_RECORD = Path(".prefect/platform.json")  # relative to the workspace; written by flows.platform
READY_POLL_SECONDS = 0.5
HEALTH_TIMEOUT_SECONDS = 15.0  # one health request; a busy server on a loaded machine answers slowly
START_LIMIT_SECONDS = float(os.environ.get("CASSAVA_PREFECT_START_LIMIT_SECONDS", "900"))  # a hung server, not load
PRIVATE_HOME_PREFIX = "cassava-prefect-"


class PrefectApiError(UserError):
    """No Prefect API could be used; the message is one line saying which and what to do (entries: exit 2)."""


@dataclass(frozen=True)
class PrefectApi:
    """The Prefect API an entry uses: its URL and where it came from."""

    url: str
    source: str  # "PREFECT_API_URL", "platform" or "private"
    detail: str = ""

    def describe(self) -> str:
        if self.source == "private":
            return f"Prefect: started a private server at {self.url} for this run ({self.detail}; it stops with the run)"
        return f"Prefect: using the server at {self.url} ({self.detail})"


@dataclass
class ServerProcess:
    url: str
    guard: subprocess.Popen[bytes]
    log_file: Path

    @property
    def pgid(self) -> int:
        return self.guard.pid  # the guard leads the server's process group


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def prefect_api(announce: Callable[[str], None] = _stderr) -> Iterator[PrefectApi]:
    """Use a running Prefect server, or a private one for the duration; announce which; yield it.

    Enter it in the process's main thread (or a thread that outlives its use). Inside, `PREFECT_API_URL`
    names the API both for Prefect in this process and for child processes.
    """
    api = running_api()
    if api is not None:
        announce(api.describe())
        with use_api(api.url):
            yield api
        return
    with private_server() as server:
        api = PrefectApi(server.url, "private", f"process group {server.pgid}")
        announce(api.describe())
        with use_api(api.url):
            yield api


def running_api() -> PrefectApi | None:
    """The server named by PREFECT_API_URL or recorded by the platform, if it answers; else None."""
    from prefect.settings import get_current_settings

    configured = os.environ.get("PREFECT_API_URL") or get_current_settings().api.url
    if configured:
        if not healthy(configured):
            raise PrefectApiError(
                f"PREFECT_API_URL={configured} does not answer (GET /health): start that server, "
                "or unset PREFECT_API_URL to run with a private one"
            )
        return PrefectApi(configured.rstrip("/"), "PREFECT_API_URL", "from PREFECT_API_URL")
    record = read_platform_record()
    if record and _process_alive(record.get("platform_pid", -1)) and healthy(record["prefect_api_url"]):
        return PrefectApi(record["prefect_api_url"], "platform", f"the platform's, pid {record['platform_pid']}")
    return None


def read_platform_record(workspace: Path | None = None) -> dict | None:
    from tasks.params import workspace_root

    path = (workspace or workspace_root()) / PLATFORM_RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def use_api(url: str) -> Iterator[None]:
    """Point Prefect (this process and its children) at `url` for the duration."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings({PREFECT_API_URL: url}):
            try:
                yield
            finally:
                _drain_prefect_workers()
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued to the server while it is up (else: "Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=30)


def healthy(api_url: str, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException, ValueError):  # refused, reset, timed out, half-started
        return False


@contextlib.contextmanager
def private_server() -> Iterator[ServerProcess]:
    """A Prefect server for this run only (see the module doc); stopped and its folder removed on exit."""
    _remove_stale_private_homes()
    home = Path(tempfile.mkdtemp(prefix=f"{PRIVATE_HOME_PREFIX}{os.getpid()}-"))
    try:
        server = start_server(home, ui=False)
        try:
            yield server
        finally:
            stop_guarded(server.guard)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def start_server(home: Path, *, ui: bool, port: int | None = None, attempts: int = 3) -> ServerProcess:
    """Start a Prefect server with PREFECT_HOME=`home` on 127.0.0.1 and wait until it answers.

    `ui=False`: API only, with the services a single run needs (as Prefect's temporary server); `ui=True`:
    `prefect server start`, UI, scheduler and every service (the platform). A free port is chosen unless
    `port` is given; if another process takes it first, start again on another one.
    """
    home.mkdir(parents=True, exist_ok=True)
    database = home / "prefect.db"
    if not database.exists():
        shutil.copyfile(migrated_database_template(), database)
    env = server_environment(home, ui)
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        url = f"http://127.0.0.1:{chosen}/api"
        if ui:
            command = ["-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(chosen)]
        else:
            command = ["-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                       "--port", str(chosen), "--log-level", "error", "--lifespan", "on"]
        server = ServerProcess(url, start_guarded([sys.executable, *command], env, home / "server.log"), home / "server.log")
        if wait_until_healthy(url, server.guard):
            return server
        stop_guarded(server.guard)
        if port is not None or attempt == attempts:
            break
    raise PrefectApiError(f"the Prefect server did not start (log: {home / 'server.log'}): {_tail(home / 'server.log')}")


def server_environment(home: Path, ui: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_PROFILES_PATH")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED=str(ui).lower())
    if not ui:
        env.update(PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")
    return env


def wait_until_healthy(url: str, guard: subprocess.Popen[bytes], limit: float = START_LIMIT_SECONDS,
                       name: str = "Prefect") -> bool:
    """Poll the server's health while its process lives. No short deadline: load only slows the start.

    `limit` guards against a server that hangs for good, not against a slow one (default 15 minutes).
    """
    started = time.monotonic()
    noted = False
    while guard.poll() is None and time.monotonic() - started < limit:
        if healthy(url, timeout=5.0):
            return True
        if not noted and time.monotonic() - started > 30:
            _stderr(f"{name}: the server at {url} is still starting (the machine is busy); waiting")
            noted = True
        time.sleep(READY_POLL_SECONDS)
    return False


def migrated_database_template() -> Path:
    """A Prefect database with every migration applied, made once per Prefect version under PREFECT_HOME.

    Runs that start together wait for the one making it (a file lock, released if its holder dies).
    """
    import prefect
    from prefect.settings import get_current_settings

    folder = Path(get_current_settings().home) / "cassava"
    folder.mkdir(parents=True, exist_ok=True)
    template = folder / f"server-template-{prefect.__version__}.db"
    with (folder / "server-template.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.exists():
            return template
        scratch = Path(tempfile.mkdtemp(prefix="template-", dir=folder))
        try:
            guard = start_guarded([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                                  server_environment(scratch, ui=False), scratch / "upgrade.log")
            if guard.wait() != 0 or not (scratch / "prefect.db").exists():
                raise PrefectApiError(f"creating Prefect's database failed: {_tail(scratch / 'upgrade.log')}")
            with contextlib.closing(sqlite3.connect(scratch / "prefect.db")) as connection:
                connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the one file we copy
            (scratch / "prefect.db").replace(template)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return template


def _remove_stale_private_homes() -> None:
    """Folders of private servers whose run was killed before it could remove them."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PRIVATE_HOME_PREFIX}*-*"):
        pid = folder.name.removeprefix(PRIVATE_HOME_PREFIX).split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    import psutil

    return pid > 0 and psutil.pid_exists(pid)


def _tail(log_file: Path, lines: int = 3) -> str:
    try:
        text = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
