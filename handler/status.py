"""Status documents the guest agent reads (`<seq>.status`): pure builders, one atomic write,
and `StatusReporter`, the service's `Reporter` that keeps the file current without idle writes.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from akvvm_ext import fsio
from akvvm_ext.logs import redact
from akvvm_ext.model import CertResult, Outcome
from akvvm_ext.service import Phase

NAME = "Microsoft.Azure.KeyVault.KeyVaultForLinux"
OPERATION = "Service start."
# Top level: warning would keep dependent extensions waiting like transitioning (SPEC 3.4/3.6);
# a substatus may say warning (e.g. an expired certificate).
STATUSES = ("transitioning", "success", "error")
SUBSTATUSES = ("transitioning", "success", "warning", "error")
MAX_FILE_BYTES = 128 * 1024  # the agent truncates past this
SUBSTATUS_BUDGET = 100 * 1024  # room left for the top level and JSON framing
MESSAGE_MAX = 1000  # the portal shows 1,024 characters of the top-level message
SUBSTATUS_MESSAGE_MAX = 400
STARTED = "Successfully started Key Vault extension service."
RETRYING = "Failed to download one or more certificates, retrying..."

Document = list[dict[str, Any]]


def utc(now: datetime) -> str:
    """The agent's timestamp format, always UTC."""
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def shorten(text: str, limit: int) -> str:
    """Cut `text` to `limit` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 15].rstrip() + " ...[truncated]"


def formatted(message: str, limit: int = MESSAGE_MAX) -> dict[str, str]:
    """The `formattedMessage` object: both keys are required by the agent. The text goes through
    the log's redaction too: a status leaves the VM."""
    return {"lang": "en-US", "message": shorten(redact(message), limit)}


def document(operation: str, status: str, message: str,
             substatus: Sequence[dict[str, Any]] = (), *, now: datetime,
             code: int | None = None) -> Document:
    """A complete status document (SPEC 3.4); `status` is one of STATUSES, lowercase; `code`
    defaults to 1 for an error (a lifecycle command passes its exit code) and 0 otherwise."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
    if bad := [e.get("status") for e in substatus if e.get("status") not in SUBSTATUSES]:
        raise ValueError(f"substatus status {bad[0]!r} is not one of {', '.join(SUBSTATUSES)}")
    body: dict[str, Any] = {
        "name": NAME, "operation": operation, "status": status,
        "code": code if code is not None else int(status == "error"),
        "formattedMessage": formatted(message),
    }
    if substatus:
        body["substatus"] = list(substatus)
    return [{"version": 1.0, "timestampUTC": utc(now), "status": body}]


def substatus_for(result: CertResult) -> dict[str, Any]:
    """One certificate's substatus: what is served where, and the last error if any."""
    failed = result.outcome is Outcome.FAILED
    parts = []
    if result.version:
        served = "still serving version" if failed else "version"
        parts.append(f"{served} {result.version}, file {result.path}, link {result.link}")
        parts.append(f"notAfter {result.not_after}")
    elif failed:
        parts.append("nothing installed yet")
    parts.extend(f"warning: {w}" for w in result.warnings)
    if failed:
        parts.append(f"error: {result.error or 'unknown error'}")
    status = "error" if failed else ("warning" if result.warnings else "success")
    return {"name": result.url, "status": status, "code": 1 if failed else 0,
            "formattedMessage": formatted("; ".join(parts), SUBSTATUS_MESSAGE_MAX)}


def substatus_list(results: Sequence[CertResult],
                   budget: int = SUBSTATUS_BUDGET) -> list[dict[str, Any]]:
    """Every certificate's substatus, failures first once over budget, the rest summarised."""
    entries = [substatus_for(r) for r in results]
    if _size(entries) <= budget:
        return entries
    entries.sort(key=lambda e: e["status"] != "error")  # stable: keeps settings order within
    kept: list[dict[str, Any]] = []
    used = 0
    for entry in entries:
        size = _size([entry]) + 1
        if used + size > budget - 300:  # leave room for the summary entry
            break
        kept.append(entry)
        used += size
    return [*kept, _summary(entries[len(kept):])]


def _summary(rest: Sequence[dict[str, Any]]) -> dict[str, Any]:
    failing = sum(1 for e in rest if e["status"] == "error")
    message = (f"{len(rest)} more certificates not listed here ({failing} failing, "
               f"{len(rest) - failing} served); the service log has each one.")
    return {"name": "more certificates", "status": "error" if failing else "success",
            "code": 1 if failing else 0, "formattedMessage": formatted(message)}


def _size(entries: Sequence[dict[str, Any]]) -> int:
    return len(json.dumps(entries, separators=(",", ":")).encode())


def headline(phase: Phase, results: Sequence[CertResult], detail: str, started: str) -> str:
    """The top-level message of SPEC 3.6 for a phase, with the service's detail appended."""
    failing = [r for r in results if r.outcome is Outcome.FAILED]
    if phase == "transitioning":
        text = RETRYING
    elif phase == "error":
        each = max(120, MESSAGE_MAX // max(len(failing), 1))
        reasons = "; ".join(f"{r.url}: {shorten(r.error or 'unknown error', each)}"
                            for r in failing)
        text = f"Failed to download {len(failing)} certificate(s): {reasons}."
    else:
        text = f"{STARTED} {started}"
        if failing:
            unserved = sum(1 for r in failing if not r.version)
            text += f" {len(failing)} of {len(results)} certificates failing"
            text += (f", {unserved} of them with nothing installed yet" if unserved
                     else ", the last good files are still served")
            text += "; see substatus."
    return f"{text} {detail}".strip() if detail else text


def write(status_dir: str, seq: int, doc: Document) -> None:
    """Write `<status_dir>/<seq>.status` atomically: temp file, fsync, rename, dir fsync."""
    data = json.dumps(doc, separators=(",", ":")).encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{seq}.status.", dir=status_dir)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, os.path.join(status_dir, f"{seq}.status"))
    except BaseException:
        fsio.remove_quietly(tmp)
        raise
    fsio.fsync_dir(status_dir)


def write_error(status_dir: str, seq: int, operation: str, message: str,
                now: datetime | None = None, code: int = 1) -> None:
    """Convenience for the one place that turns an error into a status before exiting; `code`
    is the exit code that follows, as the shell launcher and the import guard report it."""
    write(status_dir, seq, document(operation, "error", message,
                                    now=now or datetime.now(timezone.utc), code=code))


class StatusReporter:
    """The service's `Reporter`: writes `<seq>.status` only when its content changed."""

    def __init__(self, status_dir: str, seq: int,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.status_dir = status_dir
        self.seq = seq
        self._clock = clock
        self._started = utc(clock())
        self._last: Document | None = None

    def retarget(self, status_dir: str, seq: int) -> None:
        """A new enable (new seq): the next report writes the new file even if unchanged."""
        if (status_dir, seq) != (self.status_dir, self.seq):
            self.status_dir, self.seq, self._last = status_dir, seq, None

    def report(self, phase: Phase, results: Sequence[CertResult], message: str) -> None:
        """Build the document for `phase` and write it if anything but its timestamp changed."""
        now = self._clock()
        text = headline(phase, results, message, self._started)
        doc = document(OPERATION, phase, text, substatus_list(results), now=now)
        comparable = [{**doc[0], "timestampUTC": ""}]
        path = os.path.join(self.status_dir, f"{self.seq}.status")
        if comparable == self._last and os.path.exists(path):
            return
        write(self.status_dir, self.seq, doc)
        self._last = comparable
