"""The service against the stand-ins: real identity, vault, store, status files and logs, as a
process (signals, lock) or in a thread (phases, retries, load on the vault)."""
from __future__ import annotations

import itertools
import json
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import pytest

from akvvm_ext import backoff, logs
from akvvm_ext.model import CertResult, Settings
from akvvm_ext.sync import sync
from tests.standins.certfactory import Chain
from tests.standins.keyvault import KeyVaultStandin
from tests.test_service_main import (
    Layout,
    _restore_logging,
    assert_no_secrets,
    in_process,
    layout,
    spawn,
    succeeded_with,
    wait_until,
)
from tests.test_status import parse_with_agent

__all__ = ["_restore_logging", "layout", "spawn"]  # fixtures shared with test_service_main


class Arrivals:
    """Wraps the stand-in's `respond`: when each authenticated GET of a secret arrived."""

    def __init__(self, kv: KeyVaultStandin, monkeypatch: pytest.MonkeyPatch) -> None:
        self.times: dict[str, list[float]] = {}
        self.arrived = threading.Event()
        original = kv.respond

        def respond(method: str, target: str, headers: Any) -> Any:
            parts = urlsplit(target).path.split("/")
            if method == "GET" and headers.get("Authorization") and parts[1:2] == ["secrets"]:
                self.times.setdefault(parts[2].lower(), []).append(time.monotonic())
                self.arrived.set()
            return original(method, target, headers)

        monkeypatch.setattr(kv, "respond", respond)


class CountingSync:
    """The real sync pass, remembering which certificates each pass covered."""

    def __init__(self) -> None:
        self.passes: list[tuple[str, ...]] = []

    def __call__(self, settings: Settings, vaults: Any, now: datetime) -> list[CertResult]:
        self.passes.append(tuple(c.secret_name for c in settings.observed))
        return sync(settings, vaults, now)


def stop_thread(stop: threading.Event, thread: threading.Thread) -> None:
    """End an in-process service and check it ended."""
    stop.set()
    thread.join(2)
    assert not thread.is_alive()


def test_service_installs_reports_and_stops_within_a_second(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """SIGTERM ends a polling service in under a second; pidfile removed, status parseable."""
    layout.add("web", chain())
    layout.write(layout.raw("web"))
    proc = spawn()
    wait_until(lambda: succeeded_with(layout, 1))
    assert (layout.store / "localhost.web").is_symlink()
    assert (layout.state / "akvvm_service.pid").read_text().strip() == str(proc.pid)
    parsed = parse_with_agent(layout.status / "0.status")
    assert parsed.status == "success"
    assert parsed.message.startswith("Successfully started Key Vault extension service. ")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - started < 1.0
    assert not (layout.state / "akvvm_service.pid").exists()
    assert_no_secrets(layout, outputs=list(proc.communicate()))


def test_sigterm_during_a_slow_sync_exits_at_once(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync stuck on a slow vault does not hold SIGTERM; nothing half-written is visible."""
    arrivals = Arrivals(layout.kv, monkeypatch)
    layout.add("web", chain())
    layout.kv.fault("web", "delay", times=5, seconds=20)
    layout.write(layout.raw("web"))
    proc = spawn()
    assert arrivals.arrived.wait(20)  # the GET is now held by the vault
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - started < 1.0
    leftovers = [p.name for p in layout.status.iterdir() if not p.name.endswith(".status")]
    assert leftovers == []
    json.loads((layout.status / "0.status").read_text())
    assert_no_secrets(layout, outputs=list(proc.communicate()))


def test_second_instance_refuses_to_run(layout: Layout, spawn: Callable[..., Any]) -> None:
    """While one service holds the lock, another exits 0 saying so."""
    layout.write(layout.raw())
    first = spawn()
    wait_until(lambda: (layout.state / "akvvm_service.pid").exists())
    second = spawn()
    assert second.wait(10) == 0
    assert "already running" in layout.log_text()
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    assert first.wait(5) == 0


def test_sighup_reloads_settings_and_seq(layout: Layout, spawn: Callable[..., Any],
                                         chain: Callable[..., Chain]) -> None:
    """SIGHUP re-reads config.json: the new certificate installed, `<new seq>.status` written."""
    layout.add("web", chain())
    layout.add("api", chain())
    layout.write(layout.raw("web"))
    proc = spawn()
    wait_until(lambda: succeeded_with(layout, 1))
    layout.write(layout.raw("web", "api"), seq=1)
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: succeeded_with(layout, 2, seq=1), timeout=10)
    assert (layout.store / "localhost.api").is_symlink()
    assert layout.kv.count("web", status=200) == 1  # installed already: not fetched again
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert_no_secrets(layout, outputs=list(proc.communicate()))


def test_sighup_with_the_same_certificates_reports_success_at_once(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """requireInitialSync: a new seq observing the same served certificates is success at
    once, with their substatus, and without going back to transitioning or refetching."""
    layout.add("web", chain())
    layout.write(layout.raw("web", initial=True))
    proc = spawn()
    wait_until(lambda: succeeded_with(layout, 1))
    layout.write(layout.raw("web", initial=True), seq=1)
    proc.send_signal(signal.SIGHUP)
    first = wait_until(lambda: layout.status_doc(1), timeout=10)
    assert first["status"] == "success" and len(first["substatus"]) == 1
    assert layout.kv.count("web", status=200) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0


def test_initial_sync_errors_after_its_retries_then_recovers(
        layout: Layout, chain: Callable[..., Chain]) -> None:
    """A 403 vault: transitioning through the retries, then error naming the certificate; when
    fixed, success by itself."""
    layout.add("web", chain())
    layout.add("api", chain())
    layout.kv.fault("api", "forbidden", times=1000)
    layout.write(layout.raw("web", "api", initial=True))
    logs.setup(str(layout.logs), "Service")
    reporter, stop, thread = in_process(layout, scale=0.0005, rand=lambda: 0.999)
    try:
        doc = wait_until(lambda: (d := layout.status_doc()) and d["status"] == "error" and d)
        retries = reporter.phases.index("error")
        assert 20 <= retries <= 25  # fewer only when the attempts eat into the hour (scaled)
        assert reporter.phases[:retries] == ["transitioning"] * retries
        assert layout.kv.count("api") >= retries + 1 and layout.kv.count("web", status=200) == 1
        parsed = parse_with_agent(layout.status / "0.status")
        assert parsed.status == "error"
        assert f"{layout.kv.url}/secrets/api" in parsed.message and "403" in parsed.message
        assert "Key Vault Secrets User" in doc["substatus"][1]["formattedMessage"]["message"]
        layout.kv.clear_faults()
        wait_until(lambda: succeeded_with(layout, 2), timeout=30)
        assert reporter.phases[-1] == "success"
    finally:
        stop_thread(stop, thread)
    assert_no_secrets(layout)


@pytest.mark.parametrize("retry_after", [2, None])
def test_throttled_certificate_is_retried_politely(layout: Layout, chain: Callable[..., Chain],
                                                   retry_after: int | None) -> None:
    """429 (with Retry-After honoured, or without) gets retry passes; the others unharmed."""
    layout.add("web", chain())
    layout.add("api", chain())
    layout.kv.fault("api", "throttle", times=2, retry_after=retry_after)
    layout.write(layout.raw("web", "api"))
    started = time.monotonic()
    _, stop, thread = in_process(layout, scale=0.1)
    try:
        wait_until(lambda: succeeded_with(layout, 2), timeout=30)
        elapsed = time.monotonic() - started
    finally:
        stop_thread(stop, thread)
    assert layout.kv.count("api", status=429) == 2
    assert layout.kv.count("api", status=200) == 1 and layout.kv.count("web", status=200) == 1
    if retry_after:
        assert elapsed >= 2 * retry_after * 0.1


def test_idle_service_writes_nothing(layout: Layout, chain: Callable[..., Chain]) -> None:
    """Cycles with nothing new: one GET per certificate each, no status or log write."""
    layout.add("web", chain())
    layout.write(layout.raw("web", interval="100"))  # ~0.2 s at this scale
    logs.setup(str(layout.logs), "Service")
    _, stop, thread = in_process(layout, scale=0.002)
    try:
        wait_until(lambda: succeeded_with(layout, 1))
        before = [(p.name, p.stat().st_mtime_ns, p.stat().st_size)
                  for p in sorted([*layout.status.iterdir(), *layout.logs.iterdir()])]
        gets = layout.kv.count("web", status=200)
        wait_until(lambda: layout.kv.count("web", status=200) >= gets + 3)
    finally:
        stop_thread(stop, thread)
    after = [(p.name, p.stat().st_mtime_ns, p.stat().st_size)
             for p in sorted([*layout.status.iterdir(), *layout.logs.iterdir()])]
    assert after == before
    assert layout.kv.count("web") == layout.kv.count("web", status=200) + 1  # + one challenge
    assert_no_secrets(layout)


def test_throttling_storm_never_fetches_sooner_than_retry_after(
        layout: Layout, chain: Callable[..., Chain], monkeypatch: pytest.MonkeyPatch) -> None:
    """A vault answering only 429: per certificate one GET per pass, the next never sooner than
    Retry-After or the growing backoff; one token request; status says both are failing."""
    arrivals = Arrivals(layout.kv, monkeypatch)
    for name in ("web", "api"):
        layout.add(name, chain())
    layout.kv.fault(None, "throttle", times=1000, retry_after=2)
    layout.write(layout.raw("web", "api"))
    counting = CountingSync()
    logs.setup(str(layout.logs), "Service")
    _, stop, thread = in_process(layout, scale=0.05, sync=counting)  # Retry-After 2 s: 0.1 s
    try:
        wait_until(lambda: len(counting.passes) >= 4 and layout.kv.count(status=429) >= 8)
        doc = wait_until(lambda: (d := layout.status_doc()) and len(d.get("substatus", [])) == 2
                         and d)
    finally:
        stop_thread(stop, thread)
    for name in ("web", "api"):
        times = arrivals.times[name]
        assert len(times) == sum(name in p for p in counting.passes)  # one GET per pass
        gaps = [b - a for a, b in itertools.pairwise(times)]
        floors = [max(2.0, backoff.CYCLE_FIRST_S * 2**n / 2) * 0.05 for n in range(len(gaps))]
        assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), gaps
    assert layout.kv.count(status=429) == sum(len(p) for p in counting.passes)
    assert doc["status"] == "success" and "2 of 2 certificates failing" in \
        doc["formattedMessage"]["message"]
    assert all("429" in s["formattedMessage"]["message"] for s in doc["substatus"])
    assert layout.imds.token_requests == 1
    assert_no_secrets(layout)
