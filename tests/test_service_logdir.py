"""A service whose log folder cannot be used logs on stderr and keeps serving."""
from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from tests.standins.certfactory import Chain
from tests.test_service_main import (
    Layout,
    _restore_logging,
    assert_no_secrets,
    layout,
    spawn,
    succeeded_with,
    wait_until,
)

__all__ = ["_restore_logging", "layout", "spawn"]  # fixtures shared with test_service_main


def test_an_unusable_log_folder_is_said_once_on_stderr_and_the_service_runs_on(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """A file where the log folder should be: certificates still installed, one stderr line."""
    layout.add("web", chain())
    layout.write(layout.raw("web"))
    layout.logs.rmdir()
    layout.logs.write_text("a file where the log folder should be")
    proc = spawn()
    wait_until(lambda: succeeded_with(layout, 1) or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()[1].decode()[-800:]
    assert (layout.store / "localhost.web").is_symlink()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    out, err = proc.communicate()
    text = err.decode()
    assert text.count(f"cannot log to {layout.logs} (") == 1, text
    assert "Traceback" not in text and "service started" in text
    assert_no_secrets(layout, outputs=[out, err])
