"""Expected failures: one exception base, and one way every entry reports them.

An expected failure is one the user can fix: bad params, missing or unusable data, a data root that does not
exist, a tracking store that does not answer, a model URI that does not exist. Its message is one line
saying what is wrong and what to do. Every entry (`dev.py run`, the flows, `python -m tasks.cli <stage>` and
so every DVC stage, `python -m tasks.predict`) runs through `run_entry`, which ends an expected failure with
that line on stderr and exit status 2, and no traceback. Anything else is a bug and keeps its traceback.
`CASSAVA_TRACEBACK=1` prints the traceback of an expected failure too (before the line, same exit status).

This module imports nothing heavy: entries use it before TensorFlow, MLflow or Prefect load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Any, Callable, NoReturn

EXIT_STATUS = 2  # as a command-line usage error: the input is wrong, not the program
TRACEBACK_VARIABLE = "CASSAVA_TRACEBACK"


class UserError(Exception):
    """An expected failure the user can fix; str() is one line: what is wrong and what to do."""


class DataError(UserError, ValueError):
    """The data cannot be read or prepared as asked; the message says why and what to change."""


class MissingInput(UserError, FileNotFoundError):
    """A stage's input is not there yet (an earlier stage has not run); the message names the stage to run."""


class TrackingStoreError(UserError):
    """The MLflow tracking store cannot be reached or written; the message names the URI."""


def tracebacks_wanted() -> bool:
    return os.environ.get(TRACEBACK_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(error: BaseException) -> str:
    """The error's message on one line (a library's message may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def exit_on(error: UserError) -> NoReturn:
    if tracebacks_wanted():
        traceback.print_exception(error)
    print(f"error: {one_line(error)}", file=sys.stderr)
    raise SystemExit(EXIT_STATUS)


def run_entry(main: Callable[[], object]) -> None:
    """Run a command-line entry: an expected failure ends it with one line on stderr and exit status 2."""
    try:
        main()
    except UserError as error:
        exit_on(error)


class UsageError(UserError):
    """The command line itself is wrong (an unknown option, a missing argument, a value out of range)."""


def exit_without_teardown(status: int = 0) -> NoReturn:
    """End the process as `sys.exit` would, minus the interpreter's teardown: first what exit itself does
    first (join the non-daemon threads and run threading's exit hooks, then every `atexit` handler: MLflow's,
    Prefect's server stop, logging's flush, temporary folders' clean-up; then flush stdout and stderr), then
    `os._exit`. What is skipped is freeing every module and object one by one, TensorFlow's above all:
    1 to 4 s after a training, with nothing left to write by then (runs are ended and stores committed by the
    handlers above, files closed by the code that wrote them). Only for an entry whose work is done."""
    import atexit
    import threading

    threading._shutdown()  # type: ignore[attr-defined]  # what Python's exit does before its atexit handlers
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def run_command_line(app: Any, prog_name: str, work_done: Callable[[], bool] = lambda: False) -> None:
    """`run_entry` for a Typer app: its usage errors too end in one line with exit status 2 (not Click's
    usage block and error box). Once the app has succeeded and `work_done()` says it did heavy work (a
    stage, a flow), the process ends without the interpreter's teardown (`exit_without_teardown`)."""
    import typer

    def main() -> None:
        try:
            status = app(prog_name=prog_name, standalone_mode=False)
        except typer.TyperException as error:  # Typer's (vendored Click's) usage errors
            message = error.format_message().rstrip(".")
            if not message:  # no arguments at all: the help has been printed instead
                raise SystemExit(EXIT_STATUS) from None
            context = getattr(error, "ctx", None)
            raise UsageError(f"{message}; see {context.command_path if context else prog_name} --help") from None
        except typer.Abort:
            raise SystemExit(130) from None  # Ctrl-C at a prompt, as a shell reports it
        raise SystemExit(status if isinstance(status, int) else 0)

    try:
        run_entry(main)
    except SystemExit as ending:
        if ending.code in (0, None) and work_done():
            exit_without_teardown(0)
        raise


def _expected_failure_names() -> set[str]:
    names, pending = set(), [UserError]
    while pending:
        kind = pending.pop()
        names.add(kind.__name__)
        pending.extend(kind.__subclasses__())
    return names


class ExpectedFailureFilter(logging.Filter):
    """Keeps Prefect's account of an expected failure off the console: the traceback it logs for a failed task
    or flow run, and its 'Finished in state Failed(... DataError: ...)' lines. The entry prints the one line
    that matters; Prefect's own log handler (the UI) still receives everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            return False
        message = record.getMessage()
        if not message.startswith("Finished in state Failed"):
            return True
        # Prefect writes the exception into the state's message as "<ExceptionType>: <message>".
        return not any(f"{name}: " in message for name in _expected_failure_names())


def quiet_expected_failures(logger: logging.Logger | None = None) -> None:
    """Put `ExpectedFailureFilter` on the console handlers of `logger` (default: the root logger, where
    Prefect's console handler sits), unless CASSAVA_TRACEBACK asks for everything."""
    if tracebacks_wanted():
        return
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(existing, ExpectedFailureFilter) for existing in handler.filters):
            handler.addFilter(ExpectedFailureFilter())
