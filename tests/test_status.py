"""Status documents: exact shape, atomic writes, size budget, and what the real agent parses."""
from __future__ import annotations

import json
import os
import sys
import types
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from akvvm_ext.model import CertResult, Outcome
from handler import status

NOW = datetime(2026, 11, 26, 10, 0, 0, tzinfo=timezone.utc)
AGENT = Path(__file__).resolve().parent / ".cache/waagent/root/usr/lib/python3/dist-packages"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def parse_with_agent(path: Path) -> Any:
    """Parse a status file with the real WALinuxAgent code; returns its ExtensionStatus."""
    assert AGENT.is_dir(), f"real agent not unpacked at {AGENT}: run `make waagent`"
    if str(AGENT) not in sys.path:
        sys.path.insert(0, str(AGENT))
    shimmed = "distro" not in sys.modules and _shim_distro()
    try:
        from azurelinuxagent.common.protocol.restapi import ExtensionStatus
        from azurelinuxagent.ga.exthandlers import parse_ext_status
    finally:
        if shimmed:  # the agent keeps its reference; nobody else sees the shim
            del sys.modules["distro"]
    parsed = ExtensionStatus(seq_no=0)
    parse_ext_status(parsed, json.loads(path.read_text()))
    return parsed


def _shim_distro() -> bool:
    """Stand in for `distro` when absent: only the agent's import-time OS probe uses it."""
    try:
        import distro  # noqa: F401
        return False
    except ImportError:
        shim = types.ModuleType("distro")
        shim.linux_distribution = lambda full_distribution_name=True: ("debian", "12", "")  # type: ignore[attr-defined]
        shim.id = lambda: "debian"  # type: ignore[attr-defined]
        shim.version = lambda: "12"  # type: ignore[attr-defined]
        sys.modules["distro"] = shim
        return True


def ok(n: int, version: str = "v1") -> CertResult:
    """A served certificate result."""
    return CertResult(url=f"https://vault.localhost/secrets/c{n}", outcome=Outcome.UNCHANGED,
                      version=version, path=f"/store/vault.c{n}.{version}",
                      link=f"/store/vault.c{n}", not_after="2027-01-01T00:00:00Z")


def failed(n: int, error: str = "HTTP 403 Forbidden. Grant the role Key Vault Secrets User.",
           version: str | None = None) -> CertResult:
    """A failing certificate result."""
    return CertResult(url=f"https://vault.localhost/secrets/c{n}", outcome=Outcome.FAILED,
                      version=version, error=error, error_kind="FETCH",
                      path=f"/store/vault.c{n}.{version}" if version else None,
                      link=f"/store/vault.c{n}" if version else None,
                      not_after="2027-01-01T00:00:00Z" if version else None)


def test_document_has_the_exact_agent_shape() -> None:
    """The document is the SPEC 3.4 JSON, key for key."""
    doc = status.document("Service start.", "success", "hello", [status.substatus_for(ok(1))],
                          now=NOW)
    assert doc[0]["version"] == 1.0 and doc[0]["timestampUTC"] == "2026-11-26T10:00:00Z"
    body = doc[0]["status"]
    assert body["name"] == "Microsoft.Azure.KeyVault.KeyVaultForLinux"
    assert (body["operation"], body["status"], body["code"]) == ("Service start.", "success", 0)
    assert body["formattedMessage"] == {"lang": "en-US", "message": "hello"}
    assert body["substatus"][0]["name"] == "https://vault.localhost/secrets/c1"


def test_capitalised_status_is_refused() -> None:
    """`Transitioning` would silently become error in the agent, so the builder refuses it."""
    with pytest.raises(ValueError):
        status.document("Service start.", "Transitioning", "x", now=NOW)


def test_warning_is_refused_at_the_top_level_only() -> None:
    """A top-level warning would stall dependent extensions; a substatus may warn."""
    with pytest.raises(ValueError, match="warning"):
        status.document("Service start.", "warning", "x", now=NOW)
    warned = {**status.substatus_for(ok(1)), "status": "warning"}
    doc = status.document("Service start.", "success", "x", [warned], now=NOW)
    assert doc[0]["status"]["substatus"][0]["status"] == "warning"
    with pytest.raises(ValueError):
        status.document("Service start.", "success", "x", [{**warned, "status": "Warning"}],
                        now=NOW)


def test_substatus_names_version_file_link_and_expiry() -> None:
    """A served certificate's substatus says what is served where and until when."""
    message = status.substatus_for(ok(1))["formattedMessage"]["message"]
    for part in ("v1", "/store/vault.c1.v1", "/store/vault.c1", "2027-01-01"):
        assert part in message


def test_failing_certificate_keeps_saying_what_is_still_served() -> None:
    """A later failure is an error substatus that names the reason and the last good version."""
    sub = status.substatus_for(failed(2, version="v0"))
    assert sub["status"] == "error" and sub["code"] == 1
    assert "403" in sub["formattedMessage"]["message"]
    assert "still serving version v0" in sub["formattedMessage"]["message"]


def test_expired_certificate_is_a_warning_substatus() -> None:
    """An installed but expired certificate shows its warning."""
    result = CertResult(url="https://v.localhost/secrets/x", outcome=Outcome.INSTALLED,
                        version="v", warnings=("certificate expired on 2020-01-01",))
    sub = status.substatus_for(result)
    assert sub["status"] == "warning" and "expired" in sub["formattedMessage"]["message"]


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    """`write` leaves exactly `<seq>.status` with the JSON, and nothing else."""
    doc = status.document("Service start.", "success", "m", now=NOW)
    status.write(str(tmp_path), 7, doc)
    status.write(str(tmp_path), 7, doc)
    assert os.listdir(tmp_path) == ["7.status"]
    assert json.loads((tmp_path / "7.status").read_text()) == doc


def test_write_error_is_parsed_as_error_by_the_agent(tmp_path: Path) -> None:
    """The exit-path error status is read by the agent as error with our message."""
    status.write_error(str(tmp_path), 3, "Enable", "settings: bad URL", now=NOW)
    parsed = parse_with_agent(tmp_path / "3.status")
    assert parsed.status == "error" and parsed.message == "settings: bad URL"


@pytest.mark.parametrize(("phase", "results", "expected"), [
    ("transitioning", [failed(1)], "Failed to download one or more certificates, retrying..."),
    ("success", [ok(1), ok(2)], "Successfully started Key Vault extension service. "
                                "2026-11-26T10:00:00Z"),
    ("error", [ok(1), failed(2)], "Failed to download 1 certificate(s): "
                                  "https://vault.localhost/secrets/c2: HTTP 403"),
])
def test_every_phase_reads_back_through_the_agent(tmp_path: Path, phase: status.Phase,
                                                  results: list[CertResult],
                                                  expected: str) -> None:
    """Each phase's file parses with the real agent, with our status, message and substatus."""
    status.StatusReporter(str(tmp_path), 4, Clock()).report(phase, results, "")
    parsed = parse_with_agent(tmp_path / "4.status")
    assert parsed.status == phase
    assert parsed.message.startswith(expected)
    assert [s.name for s in parsed.substatusList] == [r.url for r in results]


def test_success_with_later_failures_counts_them(tmp_path: Path) -> None:
    """Top level stays success while a certificate fails later; the message counts failures."""
    status.StatusReporter(str(tmp_path), 1, Clock()).report("success", [ok(1), failed(2, "v0")],
                                                           "")
    parsed = parse_with_agent(tmp_path / "1.status")
    assert parsed.status == "success"
    assert "1 of 2 certificates failing" in parsed.message
    assert [s.status for s in parsed.substatusList] == ["success", "error"]


def test_idle_reports_do_not_rewrite_the_file(tmp_path: Path) -> None:
    """Reporting the same content again (later timestamp only) writes nothing."""
    clock = Clock()
    reporter = status.StatusReporter(str(tmp_path), 1, clock)
    reporter.report("success", [ok(1)], "")
    before = (tmp_path / "1.status").stat().st_mtime_ns
    os.utime(tmp_path / "1.status", ns=(before - 10**9, before - 10**9))
    clock.now += timedelta(hours=1)
    reporter.report("success", [ok(1)], "")
    assert (tmp_path / "1.status").stat().st_mtime_ns == before - 10**9
    reporter.report("success", [ok(1, version="v2")], "")
    assert "v2" in (tmp_path / "1.status").read_text()


def test_retarget_writes_the_new_sequence_file(tmp_path: Path) -> None:
    """After a new enable (new seq) the next report writes `<new seq>.status`."""
    reporter = status.StatusReporter(str(tmp_path), 1, Clock())
    reporter.report("success", [ok(1)], "")
    reporter.retarget(str(tmp_path), 2)
    reporter.report("success", [ok(1)], "")
    assert sorted(os.listdir(tmp_path)) == ["1.status", "2.status"]


def test_five_thousand_certificates_fit_in_128_kib(tmp_path: Path) -> None:
    """Thousands of certificates stay under the agent's limit, failures listed first."""
    results = [ok(n) for n in range(4990)] + [failed(n, "x " * 1500) for n in range(4990, 5000)]
    status.StatusReporter(str(tmp_path), 1, Clock()).report("success", results, "")
    path = tmp_path / "1.status"
    assert path.stat().st_size < status.MAX_FILE_BYTES
    parsed = parse_with_agent(path)
    assert [s.status for s in parsed.substatusList[:10]] == ["error"] * 10
    assert parsed.substatusList[-1].name == "more certificates"
    assert "not listed" in parsed.substatusList[-1].message
    assert "10 of 5000 certificates failing" in parsed.message


def test_error_message_with_many_failures_is_cut_for_the_portal(tmp_path: Path) -> None:
    """The top-level message stays within what the portal shows."""
    results = [failed(n, "reason " * 20) for n in range(100)]
    status.StatusReporter(str(tmp_path), 1, Clock()).report("error", results, "after 25 retries")
    parsed = parse_with_agent(tmp_path / "1.status")
    assert parsed.status == "error" and len(parsed.message) <= 1024
    assert parsed.message.endswith("[truncated]")


def test_headline_does_not_claim_files_are_served_when_none_was_installed() -> None:
    """'still served' only when every failing certificate has a version behind its link."""
    never = status.headline("success", [ok(1), failed(2)], "", "2026-11-26T00:00:00Z")
    assert "1 of them with nothing installed yet" in never and "still served" not in never
    kept = status.headline("success", [ok(1), failed(2, version="v0")], "", "2026-11-26T00:00:00Z")
    assert "the last good files are still served" in kept


def test_a_status_message_goes_through_the_log_redaction() -> None:
    """An error that quotes a private key or a secret bundle never reaches the status as is."""
    leaky = failed(3, 'broke on b\'{"value":"MIIKpAIBAzCCCm4GCSqG"}\' and -----BEGIN PRIVATE KEY'
                      '-----\nMIIEvQ\n-----END PRIVATE KEY-----')
    text = json.dumps(status.substatus_for(leaky))
    assert "MIIKpAIB" not in text and "MIIEvQ" not in text
    headline = status.headline("error", [leaky], "", "2026-11-26T00:00:00Z")
    assert "MIIKpAIB" not in json.dumps(status.formatted(headline))
