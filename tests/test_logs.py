"""Service logging: line format, rotation, redaction, throttling and a fluentd that never blocks."""
from __future__ import annotations

import logging
import re
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from akvvm_ext import logs
from akvvm_ext.model import LoggingTarget

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d: (INFO|WARNING|ERROR) \[[A-Za-z]+\] .+$")
KEY = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END PRIVATE KEY-----"


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Each test leaves the root logger as it found it."""
    yield
    logs.shutdown()
    logs.forget_repeats("")  # every key contains ""


def read(log_dir: Path) -> list[str]:
    """The lines of the service log."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    return (log_dir / "akvvm_service.log").read_text().splitlines()


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_line_format_and_component(tmp_path: Path) -> None:
    """Lines are `YYYY-MM-DD hh:mm:ss: LEVEL [Component] message`, component from the logger."""
    logs.setup(str(tmp_path), "Service")
    logging.getLogger("akvvm_ext.sync").info("installed %s", "web")
    logging.getLogger().warning("root says")
    logging.getLogger("x").error("explicit", extra={"component": "Identity"})
    lines = read(tmp_path)
    assert all(LINE.match(line) for line in lines), lines
    assert [line.split(": ", 1)[1] for line in lines] == [
        "INFO [Sync] installed web", "WARNING [Service] root says", "ERROR [Identity] explicit"]


def test_timestamps_are_utc(tmp_path: Path) -> None:
    """The timestamp is UTC whatever the local zone."""
    logs.setup(str(tmp_path), "Service")
    logging.getLogger().info("now")
    stamp = read(tmp_path)[0][:19]
    expected = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    assert stamp.startswith(expected[:13])


def test_log_file_is_private_and_rotates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The log is born 0600 and rotates into numbered files of bounded size."""
    monkeypatch.setattr(logs, "ROTATE_BYTES", 2000)
    (tmp_path / "akvvm_service.log").write_text("from an older version\n")
    (tmp_path / "akvvm_service.log").chmod(0o644)
    logs.setup(str(tmp_path), "Service")
    for n in range(200):
        logging.getLogger().info("line %d %s", n, "x" * 50)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "akvvm_service.log.1" in files and len(files) == logs.ROTATE_KEEP + 1
    for name in files:
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
        assert (tmp_path / name).stat().st_size <= 2100


def test_private_keys_and_tokens_are_redacted(tmp_path: Path) -> None:
    """PEM private keys, bearer tokens and token values never reach the log."""
    logs.setup(str(tmp_path), "Service")
    log = logging.getLogger("akvvm_ext.keyvault")
    log.info("value %s", KEY)
    log.info("header Authorization: Bearer abc.def-ghi")
    log.info('body {"access_token": "tok123", "expires_in": "3600"}')
    try:
        raise ValueError("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0xyz.c2lnbmF0dXJl")
    except ValueError:
        log.exception("failed")
    text = "\n".join(read(tmp_path))
    for secret in ("PRIVATE KEY", "MIIEvQ", "abc.def-ghi", "tok123", "eyJhbGci"):
        assert secret not in text
    assert "[REDACTED KEY]" in text and "expires_in" in text


def test_redact_keeps_ordinary_text() -> None:
    """Redaction leaves normal messages untouched."""
    line = "installed https://v.vault.azure.net/secrets/web version 0a1b into /store"
    assert logs.redact(line) == line


def test_throttle_logs_changes_at_once_and_repeats_sparsely() -> None:
    """A failure repeated every cycle is logged at growing intervals, a new one at once."""
    throttle = logs.Throttle()
    logged = [n for n in range(1, 101) if throttle.check("web", "403") is not None]
    assert logged == [1, 2, 4, 8, 16, 32, 64]
    assert throttle.check("web", "404") == "404"
    assert throttle.check("other", "403") == "403"
    assert throttle.clear("web") is True and throttle.clear("web") is False
    assert throttle.check("web", "404") == "404"


def test_fluentd_down_never_blocks_logging(tmp_path: Path) -> None:
    """With nothing listening, thousands of records log quickly; the excess is counted."""
    target = LoggingTarget(servicename="akvvm_service", host="127.0.0.1", port=free_port())
    fluent = logs.setup(str(tmp_path), "Service", target)
    assert fluent is not None
    start = time.monotonic()
    for n in range(5000):
        logging.getLogger().info("record %d", n)
    assert time.monotonic() - start < 2.0
    assert len(read(tmp_path)) == 5000


def test_fluentd_blackhole_drops_instead_of_waiting(tmp_path: Path) -> None:
    """A fluentd that accepts but never reads: records are dropped, never waited on."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        target = LoggingTarget(servicename="s", host="127.0.0.1", port=server.getsockname()[1])
        fluent = logs.setup(str(tmp_path), "Service", target)
        assert fluent is not None
        start = time.monotonic()
        for n in range(3000):
            logging.getLogger().info("record %d %s", n, "y " * 1000)  # not one base64 run
        assert time.monotonic() - start < 3.0
        assert fluent.dropped > 0
        start = time.monotonic()
        logs.shutdown()
        assert time.monotonic() - start < 3.0


def test_multi_line_messages_stay_one_line(tmp_path: Path) -> None:
    """A message with newlines is one log line; a traceback still follows its line."""
    logs.setup(str(tmp_path), "Service")
    logging.getLogger().info("first\nsecond")
    assert read(tmp_path)[0].endswith("INFO [Service] first\\nsecond")


def test_sdk_request_logging_is_quiet(tmp_path: Path) -> None:
    """The SDKs' per-request INFO logging never reaches the log (idle cycles write nothing)."""
    logs.setup(str(tmp_path), "Service")
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").info("Request URL: x")
    logging.getLogger("azure.identity").warning("identity trouble")
    lines = [line.split(": ", 1)[1] for line in read(tmp_path)]
    assert lines == ["WARNING [Identity] identity trouble"]


def test_repeated_failure_lines_are_thinned_until_recovery(tmp_path: Path) -> None:
    """The same warning every cycle is logged at growing intervals; after recovery at once."""
    logs.setup(str(tmp_path), "Service")
    log = logging.getLogger("akvvm.sync")
    for _ in range(10):
        log.warning("https://v/secrets/web: 403 Forbidden")
    log.warning("https://v/secrets/web: 404 SecretNotFound")
    logs.forget_repeats("https://v/secrets/web")
    log.warning("https://v/secrets/web: 403 Forbidden")
    lines = [line.split("[Sync] ", 1)[1] for line in read(tmp_path)]
    assert lines == ["https://v/secrets/web: 403 Forbidden",
                     "https://v/secrets/web: 403 Forbidden (same failure 2 times in a row)",
                     "https://v/secrets/web: 403 Forbidden (same failure 4 times in a row)",
                     "https://v/secrets/web: 403 Forbidden (same failure 8 times in a row)",
                     "https://v/secrets/web: 404 SecretNotFound",
                     "https://v/secrets/web: 403 Forbidden"]


def test_repeat_thinning_applies_once_per_record_for_all_handlers(tmp_path: Path) -> None:
    """With a second handler (fluentd), each repeat is counted once, not once per handler."""
    target = LoggingTarget(servicename="s", host="127.0.0.1", port=free_port())
    logs.setup(str(tmp_path), "Service", target)
    for _ in range(4):
        logging.getLogger("akvvm.sync").warning("same trouble")
    assert len(read(tmp_path)) == 3


def test_fluentd_records_carry_sub_second_time(tmp_path: Path) -> None:
    """Records reach the forward receiver with tag, level, component and an exact time."""
    from tests.standins.fluentd import FluentdStandin

    receiver = FluentdStandin().start()
    try:
        host, port = receiver.endpoint.removeprefix("tcp://").split(":")
        logs.setup(str(tmp_path), "Service", LoggingTarget("svc", host=host, port=int(port)))
        before = time.time()
        logging.getLogger("akvvm.sync").warning("one")
        record = receiver.wait_for(1)[0]
    finally:
        logs.shutdown()
        receiver.stop()
    assert record.tag == "svc"
    assert record.record == {"level": "WARNING", "component": "Sync", "message": "one"}
    assert before - 0.01 <= record.time <= time.time() and record.time != int(record.time)


@pytest.mark.parametrize(("line", "kept"), [
    ('{"password": "correct horse battery", "user": "bob"}', '"user": "bob"'),
    ("{'client_secret': 'correct horse', 'tenant': 't1'}", "'tenant': 't1'"),
    ('{"access_token": "abc\\"correct horse\\\\", "expires_in": "3600"}', '"expires_in": "3600"'),
    ('refresh_token="correct horse', "refresh_token="),
    ('{"accessToken": "correct horse", "expiresOn": 1}', '"expiresOn": 1'),
    ("Authorization: Basic correcthorse==", "Authorization: Basic"),
    ("proxy http://bob:correcthorse@proxy.example:3128 refused", "http://bob:"),
])
def test_quoted_secret_values_are_redacted_whole(line: str, kept: str) -> None:
    """A quoted password or token is removed entirely (spaces, escaped quotes); the rest stays."""
    clean = logs.redact(line)
    assert "correct" not in clean and "horse" not in clean, clean
    assert "[REDACTED]" in clean and kept in clean, clean


def test_a_secret_bundle_value_and_long_base64_are_redacted_but_urls_are_not() -> None:
    """`"value":"MII…"` (an answer quoted in an error) and base64 DER (`MII…`) go; a long secret
    URL with its version and a deep store path stay readable."""
    pfx = "MIIKpAIBAzCCCm4GCSqGSIb3DQEHAaCCCl8EggpbMIIKVzCCBg8GCSqGSIb3DQEHBqCC" * 4
    clean = logs.redact(f"got length b'{{\"value\":\"{pfx[:40]}\",\"id\":1}}' then {pfx}")
    assert "MIIKpAIB" not in clean and clean.count("[REDACTED") == 2, clean
    url = f"https://v.vault.azure.net/secrets/{'a' * 127}/{'0123456789abcdef' * 2}"
    assert logs.redact(f"installed {url}") == f"installed {url}"
    link = "/var/lib/waagent/store/" + "x" * 220
    assert logs.redact(f"link {link}") == f"link {link}"


def test_shutdown_keeps_its_budget_when_fluentd_stops_answering(tmp_path: Path) -> None:
    """A record fluentd never took is counted as dropped; shutdown still ends within its budget."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)  # never accepts: once its queue is full, new connects hang
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        try:
            fluent = logs.setup(str(tmp_path), "Service", LoggingTarget("s", "127.0.0.1", port))
            assert fluent is not None
            logging.getLogger().warning("fluentd will not take this")
            deadline = time.monotonic() + 10
            while not fluent.sender.pendings:  # the pump gave up on its connect and idles
                assert time.monotonic() < deadline
                time.sleep(0.02)
            start = time.monotonic()
            logs.shutdown(timeout=0.2)
            took = time.monotonic() - start
        finally:
            for filler in fillers:
                filler.close()
    assert took < 0.5, f"shutdown(timeout=0.2) took {took:.2f} s"
    assert "fluentd: 1 log records dropped in total" in (tmp_path / "akvvm_service.log").read_text()
