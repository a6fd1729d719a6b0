"""handler.service_main: config errors, --once, a service that cannot start; and the helpers the
service-process tests share (test_service_process, test_service_fluentd, test_grants)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from akvvm_ext import logs
from akvvm_ext.service import Service, SyncPass
from akvvm_ext.settings import parse
from handler import service_main, status
from tests.standins.certfactory import PKCS12, Chain, secret_value
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin
from tests.test_status import parse_with_agent

ROOT = Path(__file__).resolve().parent.parent
SCALE = "0.002"  # 25 initial retries in well under a second; poll "3600 s" ~ 7 s
SETTING_SECRET = "S3cr3t-settings-value-9f2c41d7"  # what a protected setting would carry


class Layout:
    """A state dir, status dir, log dir and store in tmp_path, and config.json for them.

    `secrets` collects what must never show in a log or status: each secret value served, a
    line of its private key, and a protected-settings value `raw` always includes.
    """

    def __init__(self, root: Path, kv: KeyVaultStandin, imds: ImdsStandin) -> None:
        self.root, self.kv, self.imds = root, kv, imds
        self.state, self.status, self.logs, self.store = (root / n for n in
                                                          ("state", "status", "log", "store"))
        for path in (self.state, self.status, self.logs):
            path.mkdir(mode=0o700)
        self.config = self.state / "config.json"
        self.secrets = [SETTING_SECRET]

    def add(self, name: str, chain: Chain) -> str:
        """Serve `chain` as a new version of secret `name`, remembering its secret parts."""
        value = secret_value(chain)
        key_lines = chain.key_pem().decode().splitlines()
        self.secrets += [value[len(value) // 2:][:64], key_lines[len(key_lines) // 2]]
        return self.kv.set_secret(name, value, PKCS12, managed=True)

    def raw(self, *names: str, initial: bool = False, interval: str = "3600",
            logging: dict[str, str] | None = None) -> dict[str, Any]:
        """Raw settings observing `names` on the stand-in vault (plus a protected value)."""
        sms = {"pollingIntervalInS": interval, "requireInitialSync": initial,
               "certificateStoreLocation": str(self.store),
               "additionalVaultDnsSuffixes": ["localhost"],
               "observedCertificates": [f"{self.kv.url}/secrets/{n}" for n in names],
               "someToken": SETTING_SECRET}
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
        return "".join(p.read_text() for p in self.logs.glob("akvvm_service*.log*"))


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
        time.sleep(0.02)
    return value


def succeeded_with(layout: Layout, count: int, seq: int = 0) -> bool:
    """`<seq>.status` says success with `count` served substatus entries."""
    doc = layout.status_doc(seq)
    return bool(doc and doc["status"] == "success"
                and [s["status"] for s in doc.get("substatus", [])] == ["success"] * count)


def assert_no_secrets(layout: Layout, extra: Sequence[str] = (), *,
                      outputs: Sequence[bytes] = ()) -> None:
    """No private key, secret value, protected setting or issued token in logs, status files,
    process output or the given texts."""
    texts = [layout.log_text(), *(p.read_text() for p in layout.status.iterdir()), *extra,
             *(o.decode(errors="replace") for o in outputs)]
    tokens = [t.token for t in layout.imds.issued_tokens]
    assert tokens and len(layout.secrets) > 1
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert not [s for s in [*tokens, *layout.secrets] if s in text]


class Recording(status.StatusReporter):
    """The real StatusReporter, also remembering every phase it was given."""

    phases: list[str]

    def report(self, phase: Any, results: Any, message: str) -> None:
        self.phases.append(phase)  # first: whoever sees the file also sees the phase
        super().report(phase, results, message)


def in_process(layout: Layout, scale: float = 0.002, *, sync: SyncPass | None = None,
               rand: Callable[[], float] | None = None,
               ) -> tuple[Recording, threading.Event, threading.Thread]:
    """The real Service, vault clients and StatusReporter in a thread of this process."""
    config = service_main.read_config(str(layout.config))
    reporter = Recording(config.status_dir, config.seq)
    reporter.phases = []
    extra: dict[str, Any] = {"rand": rand} if rand else {}
    service = Service(lambda: parse(json.loads(layout.config.read_text())["settings"]),
                      lambda s: service_main.make_vaults(s, scale), reporter, sync=sync,
                      backoff_scale=scale, **extra)
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    return reporter, stop, thread


def test_invalid_config_reports_error_and_exits_1(layout: Layout) -> None:
    """Invalid settings in config.json: exit 1 and an error status naming the problem."""
    raw = layout.raw("web")
    raw["secretsManagementSettings"]["observedCertificates"] = ["http://nope/certificates/x"]
    layout.write(raw, seq=3)
    assert service_main.main(["service", "--config", str(layout.config)]) == 1
    parsed = parse_with_agent(layout.status / "3.status")
    assert parsed.status == "error" and "observedCertificates" in parsed.message
    assert SETTING_SECRET not in (layout.status / "3.status").read_text()


def test_unreadable_config_exits_1_without_traceback(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A missing config.json is one line on stderr and exit 1."""
    assert service_main.main(["--config", str(tmp_path / "config.json")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err and "Traceback" not in err


def test_once_prints_a_summary_and_exit_code(layout: Layout, chain: Callable[..., Chain],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--once syncs once: exit 0 when all install, 1 when one fails, one line each."""
    layout.add("web", chain())
    layout.write(layout.raw("web"))
    assert service_main.main(["--config", str(layout.config), "--once"]) == 0
    first = capsys.readouterr()
    assert first.out.startswith(f"installed {layout.kv.url}/secrets/web: version ")
    layout.write(layout.raw("web", "missing"))
    assert service_main.main(["--config", str(layout.config), "--once"]) == 1
    second = capsys.readouterr()
    out = second.out.splitlines()
    assert out[0].startswith("unchanged") and out[1].startswith("failed") and "error:" in out[1]
    assert_no_secrets(layout, [first.out, first.err, second.out, second.err])


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
