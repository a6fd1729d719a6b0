"""Regressions: a failing status write never ends the service; a SIGHUP at process start
never kills it."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from akvvm_ext.model import CertResult
from akvvm_ext.service import Phase
from handler.status import StatusReporter
from tests.standins.certfactory import Chain
from tests.test_service import FakeSync, Recorder, fail, run_until, service, settings
from tests.test_service_main import (
    ROOT,
    SCALE,
    Layout,
    _restore_logging,
    layout,
    spawn,
    succeeded_with,
    wait_until,
)

__all__ = ["_restore_logging", "layout", "spawn"]  # fixtures shared with test_service_main


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



def opened_by_reader(fifo: Path) -> int | None:
    """A write end of `fifo` once a reader has it open (None before)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as err:
        if err.errno != errno.ENXIO:
            raise
        return None


def test_sighup_right_after_start_is_a_reload_not_a_death(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """enable's reload just after a start: a SIGHUP while config.json is being read (before
    logging or the lock) is applied once the service runs: new seq reported, process lives on."""
    layout.add("web", chain())
    layout.write(layout.raw("web"))
    first_config = layout.config.read_bytes()
    layout.config.unlink()
    os.mkfifo(layout.config)  # the service blocks reading it: a window we hold open
    proc = spawn()
    writer = wait_until(lambda: opened_by_reader(layout.config), timeout=10)
    proc.send_signal(signal.SIGHUP)
    layout.write(layout.raw("web"), seq=1)  # enable's new seq, replacing the fifo's name
    os.set_blocking(writer, True)
    os.write(writer, first_config)
    os.close(writer)
    wait_until(lambda: proc.poll() is not None or succeeded_with(layout, 1, seq=1))
    assert proc.poll() is None and "config reloaded (seq 1)" in layout.log_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0


def sighup_blocked(pid: int) -> bool:
    """The process has SIGHUP blocked (bin/akvvm's bootstrap does it before any import)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    blocked = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:"))
    return bool(int(blocked, 16) & (1 << (signal.SIGHUP - 1)))


def test_launcher_keeps_a_sighup_during_start_up_pending(
        layout: Layout, chain: Callable[..., Chain], monkeypatch: pytest.MonkeyPatch) -> None:
    """`bin/akvvm service` (what the unit and the daemon run): a SIGHUP that arrives while
    Python is still importing is neither fatal nor lost; the new seq gets its status."""
    monkeypatch.setenv("AKVVM_BACKOFF_SCALE", SCALE)
    layout.add("web", chain())
    layout.write(layout.raw("web"))
    first_config = layout.config.read_bytes()
    layout.config.unlink()
    os.mkfifo(layout.config)
    proc = subprocess.Popen([str(ROOT / "bin" / "akvvm"), "service", "--config",
                             str(layout.config)], cwd="/", env={**os.environ,
                            "AKVVM_PYTHON": sys.executable}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        wait_until(lambda: sighup_blocked(proc.pid), timeout=10)
        proc.send_signal(signal.SIGHUP)  # before main() runs, most likely mid-import
        writer = wait_until(lambda: opened_by_reader(layout.config), timeout=20)
        layout.write(layout.raw("web"), seq=1)
        os.set_blocking(writer, True)
        os.write(writer, first_config)
        os.close(writer)
        wait_until(lambda: proc.poll() is not None or succeeded_with(layout, 1, seq=1))
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert "config reloaded (seq 1)" in layout.log_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
