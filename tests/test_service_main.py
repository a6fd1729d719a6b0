"""The service process against the stand-ins: real identity, vault, store, status files and logs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from akvvm_ext import logs
from akvvm_ext.service import Service
from akvvm_ext.settings import parse
from handler import service_main, status
from tests.standins.certfactory import Chain
from tests.standins.fluentd import FluentdStandin
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin
from tests.test_status import parse_with_agent

ROOT = Path(__file__).resolve().parent.parent
SCALE = "0.002"  # 25 initial retries in well under a second; poll "3600 s" ~ 7 s


class Layout:
    """A state dir, status dir, log dir and store in tmp_path, and config.json for them."""

    def __init__(self, root: Path, kv: KeyVaultStandin, imds: ImdsStandin) -> None:
        self.root, self.kv, self.imds = root, kv, imds
        self.state, self.status, self.logs, self.store = (root / n for n in
                                                          ("state", "status", "log", "store"))
        for path in (self.state, self.status, self.logs):
            path.mkdir(mode=0o700)
        self.config = self.state / "config.json"

    def raw(self, *names: str, initial: bool = False, interval: str = "3600",
            logging: dict[str, str] | None = None) -> dict[str, Any]:
        """Raw settings observing `names` on the stand-in vault."""
        sms = {"pollingIntervalInS": interval, "requireInitialSync": initial,
               "certificateStoreLocation": str(self.store),
               "additionalVaultDnsSuffixes": ["localhost"],
               "observedCertificates": [f"{self.kv.url}/secrets/{n}" for n in names]}
        raw: dict[str, Any] = {"secretsManagementSettings": sms, "authenticationSettings":
                               {"msiEndpoint": f"{self.imds.url}/metadata/identity"}}
        if logging:
            raw["loggingSettings"] = logging
        return raw

    def write(self, raw: dict[str, Any], seq: int = 0) -> None:
        """Write config.json as enable does."""
        doc = {"settings": raw, "seq": seq, "statusFolder": str(self.status),
               "logFolder": str(self.logs), "extensionPath": str(ROOT),
               "handlerVersion": "3.1.0"}
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(self.config)

    def status_doc(self, seq: int = 0) -> dict[str, Any] | None:
        """The top-level status object of `<seq>.status`, if written."""
        path = self.status / f"{seq}.status"
        return json.loads(path.read_text())[0]["status"] if path.exists() else None

    def log_text(self) -> str:
        """Everything the service logged."""
        return "".join(p.read_text() for p in self.logs.glob("akvvm_service.log*"))


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Handlers installed by an in-process main() never outlive the test."""
    yield
    logs.shutdown()


@pytest.fixture
def layout(tmp_path: Path, kv: KeyVaultStandin, imds: ImdsStandin,
           azure_env: dict[str, str]) -> Layout:
    """A fresh layout against the stand-ins."""
    return Layout(tmp_path, kv, imds)


@pytest.fixture
def spawn(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Start service processes (`python -m handler.cli service`); kill leftovers by pid."""
    started: list[subprocess.Popen[bytes]] = []
    monkeypatch.setenv("AKVVM_BACKOFF_SCALE", SCALE)

    def start(*extra: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "handler.cli", "service",
                                 "--config", str(layout.config), *extra], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll until `predicate()` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)
    return value


def succeeded_with(layout: Layout, count: int, seq: int = 0) -> bool:
    """`<seq>.status` says success with `count` served substatus entries."""
    doc = layout.status_doc(seq)
    return bool(doc and doc["status"] == "success"
                and [s["status"] for s in doc.get("substatus", [])] == ["success"] * count)


def test_service_installs_reports_and_stops_within_a_second(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """SIGTERM ends a polling service in under a second; pidfile removed, status parseable."""
    layout.kv.add_certificate("web", chain())
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


def test_sigterm_during_a_slow_sync_exits_at_once(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """A sync stuck on a slow vault does not hold SIGTERM; nothing half-written is visible."""
    layout.kv.add_certificate("web", chain())
    layout.kv.fault("web", "delay", times=5, seconds=20)
    layout.write(layout.raw("web"))
    proc = spawn()
    wait_until(lambda: layout.kv.count("web", status=401) >= 1)  # next: the slow GET
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - started < 1.0
    leftovers = [p.name for p in layout.status.iterdir() if not p.name.endswith(".status")]
    assert leftovers == []
    json.loads((layout.status / "0.status").read_text())


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
    layout.kv.add_certificate("web", chain())
    layout.kv.add_certificate("api", chain())
    layout.write(layout.raw("web"))
    proc = spawn()
    wait_until(lambda: succeeded_with(layout, 1))
    layout.write(layout.raw("web", "api"), seq=1)
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: succeeded_with(layout, 2, seq=1), timeout=10)
    assert (layout.store / "localhost.api").is_symlink()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert_no_secrets(layout, [])


def test_invalid_config_reports_error_and_exits_1(layout: Layout) -> None:
    """Invalid settings in config.json: exit 1 and an error status naming the problem."""
    raw = layout.raw("web")
    raw["secretsManagementSettings"]["observedCertificates"] = ["http://nope/certificates/x"]
    layout.write(raw, seq=3)
    assert service_main.main(["service", "--config", str(layout.config)]) == 1
    parsed = parse_with_agent(layout.status / "3.status")
    assert parsed.status == "error" and "observedCertificates" in parsed.message


def test_unreadable_config_exits_1_without_traceback(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config.json is one line on stderr and exit 1."""
    assert service_main.main(["--config", str(tmp_path / "config.json")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


def test_once_prints_a_summary_and_exit_code(layout: Layout, chain: Callable[..., Chain],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--once syncs once: exit 0 when all install, 1 when one fails, one line each."""
    layout.kv.add_certificate("web", chain())
    layout.write(layout.raw("web"))
    assert service_main.main(["--config", str(layout.config), "--once"]) == 0
    assert capsys.readouterr().out.startswith(f"installed {layout.kv.url}/secrets/web: version ")
    layout.write(layout.raw("web", "missing"))
    assert service_main.main(["--config", str(layout.config), "--once"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("unchanged") and out[1].startswith("failed") and "error:" in out[1]


class Recording(status.StatusReporter):
    """The real StatusReporter, also remembering every phase it was given."""

    phases: list[str]

    def report(self, phase: Any, results: Any, message: str) -> None:
        super().report(phase, results, message)
        self.phases.append(phase)


def in_process(layout: Layout, scale: float = 0.002) -> tuple[Recording, threading.Event,
                                                                threading.Thread]:
    """The real Service, vault clients and StatusReporter in a thread of this process."""
    config = service_main.read_config(str(layout.config))
    reporter = Recording(config.status_dir, config.seq)
    reporter.phases = []
    service = Service(lambda: parse(json.loads(layout.config.read_text())["settings"]),
                      lambda s: service_main.make_vaults(s, scale), reporter, backoff_scale=scale)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    return reporter, stop, thread


def test_initial_sync_errors_after_25_retries_then_recovers(
        layout: Layout, chain: Callable[..., Chain]) -> None:
    """A 403 vault: 26 GETs, error naming the certificate; when fixed, success by itself."""
    layout.kv.add_certificate("web", chain())
    layout.kv.add_certificate("api", chain())
    layout.kv.fault("api", "forbidden", times=1000)
    layout.write(layout.raw("web", "api", initial=True))
    reporter, stop, thread = in_process(layout, scale=0.0003)
    try:
        doc = wait_until(lambda: "error" in reporter.phases and layout.status_doc())
        assert reporter.phases[:26] == ["transitioning"] * 25 + ["error"]
        assert layout.kv.count("api") >= 26 and layout.kv.count("web", status=200) == 1
        parsed = parse_with_agent(layout.status / "0.status")
        assert parsed.status == "error"
        assert f"{layout.kv.url}/secrets/api" in parsed.message and "403" in parsed.message
        assert "Key Vault Secrets User" in doc["substatus"][1]["formattedMessage"]["message"]
        layout.kv.clear_faults()
        wait_until(lambda: succeeded_with(layout, 2), timeout=30)
        assert reporter.phases[-1] == "success"
    finally:
        stop.set()
        thread.join(2)


@pytest.mark.parametrize("retry_after", [2, None])
def test_throttled_certificate_is_retried_politely(layout: Layout, chain: Callable[..., Chain],
                                                   retry_after: int | None) -> None:
    """429 (with Retry-After honoured, or without) is retried within the cycle, others unharmed."""
    layout.kv.add_certificate("web", chain())
    layout.kv.add_certificate("api", chain())
    layout.kv.fault("api", "throttle", times=2, retry_after=retry_after)
    layout.write(layout.raw("web", "api"))
    started = time.monotonic()
    _, stop, thread = in_process(layout, scale=0.1)
    try:
        wait_until(lambda: succeeded_with(layout, 2), timeout=30)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(2)
    assert layout.kv.count("api", status=429) == 2
    assert layout.kv.count("api", status=200) == 1 and layout.kv.count("web", status=200) == 1
    if retry_after:
        assert elapsed >= 2 * retry_after * 0.1


def test_fluentd_gets_records_over_tcp_and_keeps_syncing_without_it(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """Records reach fluentd (tag = servicename); with fluentd gone, rotations still install."""
    receiver = FluentdStandin().start()
    try:
        layout.kv.add_certificate("web", chain())
        target = {"logger": "fluentd", "endpoint": receiver.endpoint, "format": "forward",
                  "servicename": "akvvm_test"}
        layout.write(layout.raw("web", interval="300", logging=target))
        proc = spawn()
        wait_until(lambda: succeeded_with(layout, 1))
        records = receiver.wait_for(2, timeout=10)
        assert {r.tag for r in records} == {"akvvm_test"}
        assert any("installed version" in r.record["message"] for r in records)
    finally:
        receiver.stop()
    version = layout.kv.add_certificate("web", chain())
    wait_until(lambda: os.readlink(layout.store / "localhost.web").endswith(version), timeout=15)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert_no_secrets(layout, [r.record["message"] for r in records])


def test_fluentd_over_a_unix_socket(tmp_path: Path, layout: Layout,
                                    chain: Callable[..., Chain]) -> None:
    """The unix:// endpoint form delivers the same records."""
    receiver = FluentdStandin(unix_path=str(tmp_path / "fluent.sock")).start()
    try:
        target = parse(layout.raw("web", logging={
            "logger": "fluentd", "endpoint": receiver.endpoint, "format": "forward",
            "servicename": "svc"})).logging
        logs.setup(str(layout.logs), "Service", target)
        logs.logging.getLogger("akvvm.service").info("hello over unix")
        records = receiver.wait_for(1, timeout=5)
        assert records[0].tag == "svc" and records[0].record["message"] == "hello over unix"
        assert records[0].record["component"] == "Service"
    finally:
        logs.shutdown()
        receiver.stop()


def assert_no_secrets(layout: Layout, extra: list[str]) -> None:
    """No private key or issued token in logs, status files or the given texts."""
    texts = [layout.log_text(), *(p.read_text() for p in layout.status.iterdir()), *extra]
    tokens = [t.token for t in layout.imds.issued_tokens]
    assert tokens
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not any(token in text for token in tokens)


def test_service_that_cannot_start_reports_error(layout: Layout,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure building the clients ends the service with exit 1 and an error status."""
    def broken(settings: Any, scale: float) -> Any:
        raise service_main.ConfigError("identity endpoint unusable")

    monkeypatch.setattr(service_main, "make_vaults", broken)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    layout.write(layout.raw(), seq=5)
    try:
        config = service_main.read_config(str(layout.config))
        outcome = service_main.serve(str(layout.config), config, 0.001)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert outcome.code == 1
    parsed = parse_with_agent(layout.status / "5.status")
    assert parsed.status == "error" and "identity endpoint unusable" in parsed.message
    assert not (layout.state / "akvvm_service.pid").exists()


def test_idle_service_writes_nothing(layout: Layout, chain: Callable[..., Chain]) -> None:
    """Cycles with nothing new: one GET per certificate each, no status or log write."""
    layout.kv.add_certificate("web", chain())
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
        stop.set()
        thread.join(2)
    after = [(p.name, p.stat().st_mtime_ns, p.stat().st_size)
             for p in sorted([*layout.status.iterdir(), *layout.logs.iterdir()])]
    assert after == before
    assert layout.kv.count("web") == layout.kv.count("web", status=200) + 1  # + one challenge


def test_throttling_storm_is_bounded_per_cycle(layout: Layout, chain: Callable[..., Chain]) -> None:
    """A vault answering only 429: three GETs per certificate per cycle, one token request."""
    for name in ("web", "api"):
        layout.kv.add_certificate(name, chain())
    layout.kv.fault(None, "throttle", times=1000, retry_after=2)
    layout.write(layout.raw("web", "api"))
    _, stop, thread = in_process(layout, scale=0.05)  # Retry-After 2 s -> 0.1 s
    try:
        wait_until(lambda: layout.kv.count(status=429) >= 6)
        time.sleep(0.5)
        doc = wait_until(lambda: (d := layout.status_doc()) and len(d.get("substatus", [])) == 2
                         and d)
    finally:
        stop.set()
        thread.join(2)
    assert layout.kv.count("web", status=429) == 3 and layout.kv.count("api", status=429) == 3
    assert doc["status"] == "success" and "2 of 2 certificates failing" in \
        doc["formattedMessage"]["message"]
    assert all("429" in s["formattedMessage"]["message"] for s in doc["substatus"])
    assert layout.imds.token_requests == 1
