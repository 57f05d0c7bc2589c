"""Expected failures end in one line and exit status 2; bugs keep their traceback; Prefect's account of an
expected failure stays off the console."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.errors import DataError, ExpectedFailureFilter, UserError, quiet_expected_failures, run_entry
from tasks.params import ParamsError, code_root


def _fail(error: BaseException) -> None:
    raise error


def test_an_expected_failure_exits_2_with_one_line(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CASSAVA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exited:
        run_entry(lambda: _fail(DataError("data.root = 'x': no such folder;\n  point data.root at your images")))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: data.root = 'x': no such folder; point data.root at your images\n"


def test_the_traceback_variable_shows_the_traceback_too(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASSAVA_TRACEBACK", "1")
    with pytest.raises(SystemExit) as exited:
        run_entry(lambda: _fail(ParamsError("invalid params: train.epochs = 0")))
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith("Traceback (most recent call last):") and "in _fail" in err
    assert err.endswith("error: invalid params: train.epochs = 0\n")


def test_a_bug_keeps_its_exception() -> None:
    with pytest.raises(ZeroDivisionError):
        run_entry(lambda: 1 / 0)


def _record(name: str, message: str, error: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if error is not None:
        try:
            raise error
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, message, None, exc_info)


@pytest.mark.parametrize(
    ("name", "message", "error", "shown"),
    [
        # Prefect's traceback and its failed-state lines for an expected failure: hidden.
        ("prefect.task_runs", "Task run failed with exception: DataError('x')", DataError("x"), False),
        ("prefect.flow_runs", "Encountered exception during execution: ParamsError('x')", ParamsError("x"), False),
        ("prefect.task_runs", "Finished in state Failed('Task run encountered an exception DataError: x')",
         None, False),
        ("prefect.flow_runs", "Finished in state Failed('Flow run encountered an exception: MissingInput: x')",
         None, False),
        # A bug: everything stays.
        ("prefect.task_runs", "Task run failed with exception: KeyError('x')", KeyError("x"), True),
        ("prefect.task_runs", "Finished in state Failed('Task run encountered an exception KeyError: x')", None, True),
        # Our own loggers and successful states: untouched.
        ("tasks.data", "prepare: skipped a.jpg", DataError("x"), True),
        ("prefect.task_runs", "Finished in state Completed()", None, True),
    ],
)
def test_prefect_console_filter(name: str, message: str, error: BaseException | None, shown: bool) -> None:
    assert ExpectedFailureFilter().filter(_record(name, message, error)) is shown


def test_filter_goes_on_the_console_handlers_once_and_not_with_the_traceback_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("tests.errors.console")
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        monkeypatch.setenv("CASSAVA_TRACEBACK", "1")
        quiet_expected_failures(logger)
        assert handler.filters == []
        monkeypatch.delenv("CASSAVA_TRACEBACK")
        quiet_expected_failures(logger)
        quiet_expected_failures(logger)
        assert [type(item) for item in handler.filters] == [ExpectedFailureFilter]
    finally:
        logger.removeHandler(handler)


def test_every_expected_failure_of_the_stages_is_a_user_error() -> None:
    from tasks.data import DataError as StageDataError
    from tasks.predict import PredictionError
    from tasks.train import TrainingDiverged

    assert StageDataError is DataError
    for kind in (DataError, ParamsError, PredictionError, TrainingDiverged):
        assert issubclass(kind, UserError)
    assert issubclass(ParamsError, ValueError) and issubclass(DataError, ValueError)  # callers catching ValueError


def test_exit_without_teardown_still_finishes_threads_exit_handlers_and_output(tmp_path: Path) -> None:
    """What an entry skips after its work is the interpreter's teardown only: a thread still working is
    waited for, exit handlers run, buffered output is written, and the status is the one given."""
    script = (
        "import atexit, pathlib, sys, threading, time\n"
        "from tasks.errors import exit_without_teardown\n"
        f"folder = pathlib.Path({str(tmp_path)!r})\n"
        "def late_writer():\n"
        "    time.sleep(0.5)\n"
        "    (folder / 'thread.txt').write_text('written')\n"
        "threading.Thread(target=late_writer).start()\n"
        "atexit.register(lambda: (folder / 'atexit.txt').write_text(str((folder / 'thread.txt').exists())))\n"
        "sys.stdout.write('buffered, no newline')\n"
        "exit_without_teardown(3)\n"
        "print('never here')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=code_root(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 3
    assert result.stdout == "buffered, no newline"
    assert (tmp_path / "atexit.txt").read_text() == "True"  # the thread had ended before the handlers ran
