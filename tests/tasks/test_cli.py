"""The stage command line: each stage says it starts before its slow imports."""

from __future__ import annotations

import logging

import pytest

from tasks.cli import stage_entry


def test_a_stage_says_what_it_starts_before_importing_it(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks.cli"):
        entry = stage_entry("acquire")
    assert entry.__name__ == "run_acquire"
    assert caplog.messages == ["acquire: starting (writing the data source into data/raw)"]
