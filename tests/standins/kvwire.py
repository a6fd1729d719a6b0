"""The Key Vault wire as the stand-in writes it: error bodies and challenges, list pages with an
absolute nextLink, and the queue of scripted faults. No I/O.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from tests.standins.tls import Reply, json_reply

FAULT_KINDS = ("forbidden", "throttle", "server_error", "delay", "reset", "malformed",
               "proxy_page", "false_chunked")

_NOT_FOUND = ("A secret with (name/id) {} was not found in this key vault. If you recently deleted "
              "this secret you may be able to recover it using the correct recovery command. For "
              "help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182")
_FORBIDDEN = ("Caller is not authorized to perform action on resource.\r\nIf role assignments, "
              "deny assignments or role definitions were changed recently, please observe "
              "propagation time.\r\nAction: 'Microsoft.KeyVault/vaults/secrets/getSecret/action'")
_THROTTLED = ("Request was not processed because too many requests were received. "
              "Reason: VaultRequestTypeLimitReached")
_SERVER = {500: ("InternalServerError", "The service encountered an internal error."),
           503: ("ServiceUnavailable", "The service is temporarily unavailable.")}


def error(status: int, code: str, message: str, inner: str | None = None,
          headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    detail: dict[str, Any] = {"code": code, "message": message}
    if inner:
        detail["innererror"] = {"code": inner}
    return json_reply(status, {"error": detail}, headers)


def challenge(tenant: str, message: str) -> Reply:
    value = (f'Bearer authorization="https://login.microsoftonline.com/{tenant}", '
             'resource="https://vault.azure.net"')
    return error(401, "Unauthorized", message, headers=(("WWW-Authenticate", value),))


def not_found(name: str) -> Reply:
    return error(404, "SecretNotFound", _NOT_FOUND.format(name))


def disabled() -> Reply:
    return error(403, "Forbidden", "Operation get is not allowed on a disabled secret.",
                 "SecretDisabled")


def page(items: list[dict[str, Any]], query: dict[str, list[str]], page_size: int,
         link_base: str) -> Reply:
    """One page of a list, with an absolute nextLink when more remain."""
    size = int(query.get("maxresults", [str(page_size)])[0])
    if not 1 <= size <= 25:
        return error(400, "BadParameter", "The value of maxresults must be between 1 and 25.")
    token = (query.get("$skiptoken") or [""])[0]
    start = int(base64.urlsafe_b64decode(token + "==").decode() or 0) if token else 0
    document: dict[str, Any] = {"value": items[start:start + size], "nextLink": None}
    if start + size < len(items):
        skip = base64.urlsafe_b64encode(str(start + size).encode()).decode().rstrip("=")
        api = (query.get("api-version") or ["7.5"])[0]
        params = urlencode({"api-version": api, "$skiptoken": skip, "maxresults": size})
        document["nextLink"] = f"{link_base}?{params}"
    return json_reply(200, document)


def secret_name(path: str) -> str | None:
    """The secret a request path names (lower case), None for the list of all secrets."""
    segments = path.split("/")
    return segments[2].lower() if len(segments) > 2 and segments[1] == "secrets" else None


@dataclass
class Fault:
    """A scripted answer for `times` requests naming secret `name` (None: any request)."""

    name: str | None
    kind: str
    times: int
    status: int | None = None
    retry_after: int | None = None
    seconds: float = 0.0
    inner: str = "ForbiddenByRbac"

    def reply(self) -> Reply | None:
        """The reply this fault sends (None: reset the connection)."""
        if self.kind == "forbidden":
            return error(self.status or 403, "Forbidden", _FORBIDDEN, self.inner)
        if self.kind == "throttle":
            wait = self.retry_after
            after = (("Retry-After", str(wait)),) if wait is not None else ()
            return error(self.status or 429, "Throttled", _THROTTLED, headers=after)
        if self.kind == "server_error":
            code, message = _SERVER.get(self.status or 500, _SERVER[500])
            return error(self.status or 500, code, message)
        if self.kind == "malformed":
            return Reply(200, b'{"value": "MIIK')
        if self.kind == "proxy_page":  # what a filtering proxy or captive portal answers
            return Reply(200, b"<html><body>Blocked by policy</body></html>",
                         (("Content-Type", "text/html"),))
        return None


def false_chunked(reply: Reply) -> Reply:
    """The real answer, `value` first as Key Vault orders it, under a `Transfer-Encoding:
    chunked` header its body does not follow (a proxy that de-chunks and keeps the header): the
    client's chunk parser then reads the start of the secret as a chunk length."""
    document = json.loads(reply.body)
    if "value" in document:
        document = {"value": document.pop("value"), **document}
    return Reply(reply.status, json.dumps(document, separators=(",", ":")).encode(),
                 (*reply.headers, ("Transfer-Encoding", "chunked"), ("Connection", "close")))


class FaultQueue:
    """Scripted faults in the order given; each is used up after `times` requests. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        if fault.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {fault.kind!r}; expected one of {FAULT_KINDS}")
        with self._lock:
            self._faults.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def take(self, name: str | None) -> Fault | None:
        """The first fault still due for a request naming secret `name`, counted as used."""
        with self._lock:
            for fault in self._faults:
                if fault.times > 0 and fault.name in (None, name):
                    fault.times -= 1
                    return fault
        return None
