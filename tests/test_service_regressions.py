"""Regressions: a failing status write never ends the service; a SIGHUP at process start
never kills it."""
from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from akvvm_ext.model import CertResult
from akvvm_ext.service import Phase
from handler.status import StatusReporter
from tests.test_service import FakeSync, Recorder, fail, run_until, service, settings


class FlakyDisk(Recorder):
    """A Recorder whose write fails with ENOSPC on the given (1-based) calls."""

    def __init__(self, failing_calls: set[int]) -> None:
        super().__init__()
        self.failing_calls, self.calls = failing_calls, 0

    def report(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        self.calls += 1
        if self.calls in self.failing_calls:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().report(phase, results, message)


def test_full_disk_during_polling_keeps_the_service_polling(
        caplog: pytest.LogCaptureFixture) -> None:
    """ENOSPC on status writes: polling goes on, one log line per error, later reports land."""
    fake, disk = FakeSync(), FlakyDisk(set(range(2, 6)))
    with caplog.at_level(logging.ERROR, logger="akvvm.service"):
        run_until(service(lambda: settings("a", "b"), fake, disk), fake, 8)
    assert len(fake.calls) == 8
    assert disk.calls > 5 and disk.phases[-1] == "success" and len(disk.reports[-1][1]) == 2
    assert len([r for r in caplog.records if "cannot write the status" in r.message]) == 1


def test_full_disk_during_initial_retries_keeps_retrying() -> None:
    """ENOSPC on the transitioning reports: the initial retries go on and success is reported."""
    fake = FakeSync(scripts={"b": lambda n: fail("https://vault.localhost/secrets/b")
                             if n <= 3 else None})
    disk = FlakyDisk({1, 2, 3})
    run_until(service(lambda: settings("a", "b", initial=True), fake, disk), fake, 6)
    assert [names for _, names in fake.calls[:4]] == [("a", "b"), ("b",), ("b",), ("b",)]
    assert disk.phases[-1] == "success"


def test_missing_status_dir_is_written_once_it_exists(tmp_path: Path) -> None:
    """The real reporter: no status dir at first; the next pass after it appears writes it."""
    status_dir = tmp_path / "status"
    reporter = StatusReporter(str(status_dir), 3)
    fake, stop = FakeSync(), threading.Event()
    fake.on_pass = lambda n: status_dir.mkdir() if n == 3 else stop.set() if n >= 5 else None
    service(lambda: settings("a"), fake, reporter).run(stop)  # type: ignore[arg-type]
    written = json.loads((status_dir / "3.status").read_text())
    assert written[0]["status"]["status"] == "success"
