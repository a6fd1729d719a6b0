"""Key Vault stand-in: an HTTPS server on 127.0.0.1 speaking the secrets data-plane

API (thread-safe):
    KeyVaultStandin(accept_token=None, tenant=TENANT, page_size=25, port=0)  context manager
      .start() / .stop() / .url ("https://localhost:<port>") / .ca_path / .latency (s per request)
      .add_certificate(name, chain, content_type=PKCS12, legacy=True) -> version  (a rotation)
      .set_secret(name, value, content_type=None, managed=False, ...) -> version
      .disable_version(name, version=None) / .enable_version(...) / .delete(name)
      .versions(name) -> [version, ...] oldest first / .secret_id(name, version=None) -> URL
      .value(name, version=None) -> the secret value a GET returns
      .fault(name_or_None, kind, times=1, *, status=, retry_after=, seconds=, inner=)
          kinds: forbidden, throttle, server_error, delay, reset, malformed, proxy_page,
          false_chunked;
          .clear_faults()
      .requests -> [(method, path, status)] (status 0: reset) / .count(name=None, method="GET",
          status=None) / .reset_counters()
No bearer token: 401 with the `WWW-Authenticate: Bearer authorization=…, resource=…` challenge.
Error bodies, list pages and the fault queue are in `kvwire`; this module keeps the vault.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.standins.certfactory import PEM, PKCS12, Chain, to_kv_pem, to_pfx
from tests.standins.kvwire import (
    FAULT_KINDS,
    Fault,
    FaultQueue,
    challenge,
    disabled,
    error,
    false_chunked,
    not_found,
    page,
    secret_name,
)
from tests.standins.tls import LoopbackServer, Reply, json_reply, run_ca

__all__ = ["FAULT_KINDS", "TENANT", "KeyVaultStandin"]

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


@dataclass
class _Version:
    name: str
    version: str
    value: str
    content_type: str | None
    created: int
    managed: bool = False
    enabled: bool = True
    nbf: int | None = None
    exp: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    chain: Chain | None = None


class KeyVaultStandin:
    """A vault on loopback; see the module docstring for the API."""

    def __init__(self, accept_token: Callable[[str], bool] | None = None, tenant: str = TENANT,
                 page_size: int = 25, port: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        self.accept_token = accept_token
        self.tenant = tenant
        self.page_size = page_size
        self.latency = 0.0
        self.requests: list[tuple[str, str, int]] = []
        self._clock = clock
        self._lock = threading.RLock()
        self._secrets: dict[str, list[_Version]] = {}
        self._faults = FaultQueue()
        self._ca = run_ca()
        self._server = LoopbackServer(self, self._ca.server_context(), port)

    # lifecycle
    @property
    def url(self) -> str:
        return f"https://localhost:{self._server.port}"

    @property
    def ca_path(self) -> str:
        return self._ca.ca_path

    def start(self) -> KeyVaultStandin:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> KeyVaultStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # content
    def add_certificate(self, name: str, chain: Chain, content_type: str = PKCS12,
                        legacy: bool = True, enabled: bool = True) -> str:
        """Add a new version of a certificate-backed secret (what a rotation does)."""
        if content_type == PEM:
            value = to_kv_pem(chain)
        else:
            value = base64.b64encode(to_pfx(chain, legacy=legacy)).decode("ascii")
        leaf = chain.leaf
        return self._add(name, value, content_type, managed=True, enabled=enabled, chain=chain,
                         nbf=int(leaf.not_valid_before_utc.timestamp()),
                         exp=int(leaf.not_valid_after_utc.timestamp()))

    def set_secret(self, name: str, value: str, content_type: str | None = None,
                   managed: bool = False, enabled: bool = True, not_before: int | None = None,
                   expires: int | None = None, tags: dict[str, str] | None = None) -> str:
        """Add a new version of a plain secret."""
        return self._add(name, value, content_type, managed=managed, enabled=enabled,
                         nbf=not_before, exp=expires, tags=dict(tags or {}))

    def _add(self, name: str, value: str, content_type: str | None, **extra: Any) -> str:
        with self._lock:
            versions = self._secrets.setdefault(name.lower(), [])
            stored_name = versions[0].name if versions else name
            version = uuid.uuid4().hex
            versions.append(_Version(stored_name, version, value, content_type,
                                     int(self._clock()), **extra))
            return version

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return [v.version for v in self._secrets.get(name.lower(), [])]

    def value(self, name: str, version: str | None = None) -> str:
        """The secret value a GET of that version returns (tests look for it where it must not
        appear)."""
        return self._find(name, version).value

    def secret_id(self, name: str, version: str | None = None) -> str:
        return f"{self.url}/secrets/{name}" + (f"/{version}" if version else "")

    def disable_version(self, name: str, version: str | None = None) -> None:
        self._find(name, version).enabled = False

    def enable_version(self, name: str, version: str | None = None) -> None:
        self._find(name, version).enabled = True

    def delete(self, name: str) -> None:
        with self._lock:
            del self._secrets[name.lower()]

    def _find(self, name: str, version: str | None) -> _Version:
        with self._lock:
            found = self._lookup(name, version)
        if found is None:
            raise KeyError(f"{name}/{version}")
        return found

    def _lookup(self, name: str, version: str | None) -> _Version | None:
        versions = self._secrets.get(name.lower(), [])
        if not version:
            return versions[-1] if versions else None
        return next((v for v in versions if v.version == version), None)

    # faults and counters
    def fault(self, name: str | None, kind: str, times: int = 1, *, status: int | None = None,
              retry_after: int | None = None, seconds: float = 0.0,
              inner: str = "ForbiddenByRbac") -> None:
        """Script `times` faulty answers to authenticated requests for `name` (None: any)."""
        self._faults.add(Fault(name and name.lower(), kind, times, status, retry_after, seconds,
                               inner))

    def clear_faults(self) -> None:
        self._faults.clear()

    def count(self, name: str | None = None, method: str = "GET", status: int | None = None) -> int:
        """Requests seen for secret `name` (None: all), by method and optionally status."""
        with self._lock:
            return sum(1 for m, p, s in self.requests
                       if m == method and (status is None or s == status)
                       and (name is None or secret_name(p) == name.lower()))

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    # serving
    def respond(self, method: str, target: str, headers: Any) -> Reply | None:
        """The reply to one request, or None to reset the connection."""
        if self.latency:
            time.sleep(self.latency)
        parts = urlsplit(target)
        reply = self._authenticate(headers)
        if reply is None:
            fault = self._faults.take(secret_name(parts.path))
            if fault is not None and fault.kind == "delay":
                time.sleep(fault.seconds)
            elif fault is not None and fault.kind == "false_chunked":
                base = f"https://{headers.get('Host') or self.url[8:]}"
                reply = false_chunked(self._route(method, parts.path, parse_qs(parts.query), base))
            elif fault is not None:
                reply = fault.reply()
                if reply is None:
                    self._record(method, parts.path, 0)
                    return None
        if reply is None:
            base = f"https://{headers.get('Host') or self.url[8:]}"
            reply = self._route(method, parts.path, parse_qs(parts.query), base)
        self._record(method, parts.path, reply.status)
        return reply

    def _authenticate(self, headers: Any) -> Reply | None:
        scheme, _, token = (headers.get("Authorization") or "").partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            if self.accept_token is None or self.accept_token(token.strip()):
                return None
            return challenge(self.tenant, "AKV10032: Invalid issuer.")
        return challenge(self.tenant, "AKV10000: Request is missing a Bearer or PoP token.")

    def _route(self, method: str, path: str, query: dict[str, list[str]], base: str) -> Reply:
        segments = path.split("/")[1:]
        if method != "GET" or not segments or segments[0] != "secrets" or len(segments) > 3:
            return error(404, "NotFound", f"The requested path {path} was not found.")
        out_type = query.get("outContentType", [""])[0]
        with self._lock:
            if len(segments) == 1:
                return self._list(query, base, path, None)
            name = segments[1]
            rest = segments[2] if len(segments) == 3 else ""
            if rest == "versions":
                return self._list(query, base, path, name)
            found = self._lookup(name, rest or None)
            if found is None:
                return not_found(f"{name}/{rest}" if rest else name)
            if not found.enabled:
                return disabled()
            return json_reply(200, self._bundle(found, base, out_type))

    def _list(self, query: dict[str, list[str]], base: str, path: str,
              name: str | None) -> Reply:
        if name is None:
            rows = [v[-1] for _, v in sorted(self._secrets.items())]
        else:
            rows = sorted(self._secrets.get(name.lower(), []), key=lambda v: v.version)
        items = [self._item(v, base, versioned=name is not None) for v in rows]
        return page(items, query, self.page_size, base + path)

    def _bundle(self, v: _Version, base: str, out_type: str) -> dict[str, Any]:
        item = self._item(v, base, versioned=True)
        item["value"] = v.value
        if v.chain is not None and out_type in (PEM, PKCS12) and out_type != v.content_type:
            item["contentType"] = out_type
            item["value"] = to_kv_pem(v.chain) if out_type == PEM else base64.b64encode(
                to_pfx(v.chain)).decode("ascii")
        item.setdefault("tags", {})
        if v.managed:
            item["kid"] = f"{base}/keys/{v.name}/{v.version}"
        return item

    def _item(self, v: _Version, base: str, versioned: bool) -> dict[str, Any]:
        attributes: dict[str, Any] = {"enabled": v.enabled}
        attributes.update({k: t for k, t in (("nbf", v.nbf), ("exp", v.exp)) if t is not None})
        attributes.update(created=v.created, updated=v.created,
                          recoveryLevel="Recoverable+Purgeable", recoverableDays=90)
        item: dict[str, Any] = {"id": f"{base}/secrets/{v.name}" + (f"/{v.version}" if versioned
                                                                      else ""),
                                "attributes": attributes}
        if v.content_type is not None:
            item["contentType"] = v.content_type
        if v.tags:
            item["tags"] = dict(v.tags)
        if v.managed:
            item["managed"] = True
        return item
