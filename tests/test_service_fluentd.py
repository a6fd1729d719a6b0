"""The service's records reach fluentd (tcp and unix socket), and syncing never waits for it."""
from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from akvvm_ext import logs
from akvvm_ext.settings import parse
from tests.standins.certfactory import Chain
from tests.standins.fluentd import FluentdStandin
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


def test_fluentd_gets_records_over_tcp_and_keeps_syncing_without_it(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """Records reach fluentd (tag = servicename); with fluentd gone, rotations still install."""
    receiver = FluentdStandin().start()
    try:
        layout.add("web", chain())
        target = {"logger": "fluentd", "endpoint": receiver.endpoint, "format": "forward",
                  "servicename": "akvvm_test"}
        layout.write(layout.raw("web", interval="300", logging=target))
        proc = spawn()
        wait_until(lambda: succeeded_with(layout, 1))
        receiver.wait_for(2, timeout=10)
        wait_until(lambda: any("installed version" in r.record["message"]
                               for r in receiver.records))
    finally:
        receiver.stop()
    records = receiver.records
    assert {r.tag for r in records} == {"akvvm_test"}
    version = layout.add("web", chain())
    wait_until(lambda: os.readlink(layout.store / "localhost.web").endswith(version), timeout=15)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert_no_secrets(layout, [str(r.record) for r in records], outputs=list(proc.communicate()))


def test_fluentd_over_a_unix_socket(tmp_path: Path, layout: Layout) -> None:
    """The unix:// endpoint form delivers the same records."""
    receiver = FluentdStandin(unix_path=str(tmp_path / "fluent.sock")).start()
    try:
        target = parse(layout.raw("web", logging={
            "logger": "fluentd", "endpoint": receiver.endpoint, "format": "forward",
            "servicename": "svc"})).logging
        logs.setup(str(layout.logs), "Service", target)
        logging.getLogger("akvvm.service").info("hello over unix")
        records = receiver.wait_for(1, timeout=5)
        assert records[0].tag == "svc" and records[0].record["message"] == "hello over unix"
        assert records[0].record["component"] == "Service"
    finally:
        logs.shutdown()
        receiver.stop()
