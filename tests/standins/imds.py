"""IMDS / Azure Arc stand-in: the managed-identity token endpoint over plain HTTP on 127.0.0.1.

API (thread-safe):
    ImdsStandin(mode="imds"|"arc", client_ids=(), system_identity=True, expires_in=86399,
                port=0, key_dir=ARC_KEY_DIR)   context manager; .start() / .stop()
      .url ("http://127.0.0.1:<port>") / .token_url (url + TOKEN_PATH, Arc's IDENTITY_ENDPOINT)
      .add_identity(client_id, object_id=None, resource_id=None)
      .fault(status, times=1, retry_after=None)   404/410/429/5xx answers to the next requests
      .token_requests (int) / .requests [(path, status)] / .issued_tokens [IssuedToken]
      .token_issued(token) -> bool   (for KeyVaultStandin(accept_token=...))
Arc mode answers a request without `Authorization: Basic <key>` with 401 and
`WWW-Authenticate: Basic realm=<key_dir>/<uuid>.key`, a file it writes (and removes on stop);
MSAL reads the key from /var/opt/azcmagent/tokens/ only, so Arc mode needs that directory.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.standins.tls import LoopbackServer, Reply, json_reply

TOKEN_PATH = "/metadata/identity/oauth2/token"
ARC_KEY_DIR = "/var/opt/azcmagent/tokens"
SYSTEM_CLIENT_ID = "5c4f7d1e-0a1b-4c2d-8e3f-9a0b1c2d3e4f"
_FAULTS = {
    404: ("not_found", "The requested resource was not found."),
    410: ("gone", "IMDS is being upgraded."),
    429: ("too_many_requests", "Too many requests."),
    500: ("unknown_error", "An unexpected error occurred."),
    503: ("service_unavailable", "The service is unavailable."),
}


@dataclass(frozen=True)
class IssuedToken:
    token: str
    client_id: str
    resource: str


@dataclass(frozen=True)
class _Identity:
    client_id: str
    object_id: str
    resource_id: str


class ImdsStandin:
    """A token endpoint on loopback; see the module docstring for the API."""

    def __init__(self, mode: str = "imds", client_ids: Iterable[str] = (),
                 system_identity: bool = True, expires_in: int = 86399, port: int = 0,
                 key_dir: str = ARC_KEY_DIR, clock: Callable[[], float] = time.time) -> None:
        if mode not in ("imds", "arc"):
            raise ValueError(f"mode must be 'imds' or 'arc', not {mode!r}")
        self.mode = mode
        self.expires_in = expires_in
        self.token_requests = 0
        self.requests: list[tuple[str, int]] = []
        self.issued_tokens: list[IssuedToken] = []
        self.system = _identity(SYSTEM_CLIENT_ID) if system_identity else None
        self._identities = [_identity(c) for c in client_ids]
        self._faults: list[list[Any]] = []  # [status, remaining, retry_after]
        self._key_dir = Path(key_dir)
        self._keys: dict[str, Path] = {}  # secret -> key file
        self._created_dirs: list[Path] = []
        self._clock = clock
        self._lock = threading.Lock()
        self._server = LoopbackServer(self, None, port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.port}"

    @property
    def token_url(self) -> str:
        return self.url + TOKEN_PATH

    def start(self) -> ImdsStandin:
        if self.mode == "arc":
            self._make_key_dir()
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()
        with self._lock:
            for path in self._keys.values():
                path.unlink(missing_ok=True)
            self._keys.clear()
        for directory in reversed(self._created_dirs):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        self._created_dirs.clear()

    def __enter__(self) -> ImdsStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_identity(self, client_id: str, object_id: str | None = None,
                     resource_id: str | None = None) -> None:
        """Assign a user-assigned identity to this 'VM'."""
        with self._lock:
            self._identities.append(_identity(client_id, object_id, resource_id))

    def fault(self, status: int, times: int = 1, retry_after: int | None = None) -> None:
        """Answer the next `times` token requests with `status` (IMDS's error body)."""
        if status not in _FAULTS:
            raise ValueError(f"status must be one of {sorted(_FAULTS)}")
        with self._lock:
            self._faults.append([status, times, retry_after])

    def token_issued(self, token: str) -> bool:
        with self._lock:
            return any(t.token == token for t in self.issued_tokens)

    @property
    def key_files(self) -> list[Path]:
        with self._lock:
            return list(self._keys.values())

    def respond(self, method: str, target: str, headers: Any) -> Reply | None:
        parts = urlsplit(target)
        reply = self._answer(method, parts.path, parse_qs(parts.query), headers)
        with self._lock:
            self.requests.append((parts.path, reply.status))
        return reply

    def _answer(self, method: str, path: str, query: dict[str, list[str]], headers: Any) -> Reply:
        if method != "GET" or path.rstrip("/") != TOKEN_PATH:
            return _error(404, "not_found", f"{path} is not a managed identity endpoint")
        with self._lock:
            self.token_requests += 1
        if (headers.get("Metadata") or "").lower() != "true":
            return _error(400, "invalid_request", "Required metadata header not specified")
        if self.mode == "arc" and not self._basic_ok(headers.get("Authorization") or ""):
            return self._arc_challenge()
        fault = self._take_fault()
        if fault is not None:
            return fault
        for key in ("api-version", "resource"):
            if not query.get(key):
                return _error(400, "invalid_request", f"Required query variable '{key}' is missing")
        identity = self._select(query)
        if identity is None:
            return _error(400, "invalid_request", "Identity not found")
        return json_reply(200, self._issue(identity, query["resource"][0]))

    def _select(self, query: dict[str, list[str]]) -> _Identity | None:
        wanted = {k: v[0].lower() for k, v in query.items()
                  if k in ("client_id", "object_id", "msi_res_id", "mi_res_id")}
        if not wanted:
            return self.system
        with self._lock:
            for identity in self._identities:
                ids = {"client_id": identity.client_id, "object_id": identity.object_id,
                       "msi_res_id": identity.resource_id, "mi_res_id": identity.resource_id}
                if all(ids[k].lower() == v for k, v in wanted.items()):
                    return identity
        return None

    def _issue(self, identity: _Identity, resource: str) -> dict[str, str]:
        now = int(self._clock())
        token = f"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.standin.{secrets.token_hex(16)}"
        with self._lock:
            self.issued_tokens.append(IssuedToken(token, identity.client_id, resource))
        expires = str(self.expires_in)
        return {"access_token": token, "client_id": identity.client_id, "expires_in": expires,
                "expires_on": str(now + self.expires_in), "ext_expires_in": expires,
                "not_before": str(now), "resource": resource, "token_type": "Bearer"}

    def _take_fault(self) -> Reply | None:
        with self._lock:
            for fault in self._faults:
                status, remaining, retry_after = fault
                if remaining > 0:
                    fault[1] -= 1
                    after = (("Retry-After", str(retry_after)),) if retry_after is not None else ()
                    return _error(status, *_FAULTS[status], headers=after)
        return None

    # Azure Arc
    def _make_key_dir(self) -> None:
        missing = [p for p in (self._key_dir, *self._key_dir.parents) if not p.exists()]
        for directory in reversed(missing):
            directory.mkdir(mode=0o755)
            self._created_dirs.append(directory)

    def _arc_challenge(self) -> Reply:
        secret = secrets.token_urlsafe(32)
        path = self._key_dir / f"{uuid.uuid4()}.key"
        path.write_text(secret)
        path.chmod(0o600)
        with self._lock:
            self._keys[secret] = path
        return Reply(401, b"", (("WWW-Authenticate", f"Basic realm={path}"),))

    def _basic_ok(self, authorization: str) -> bool:
        scheme, _, secret = authorization.partition(" ")
        with self._lock:
            return scheme.lower() == "basic" and secret.strip() in self._keys


def _identity(client_id: str, object_id: str | None = None,
              resource_id: str | None = None) -> _Identity:
    object_id = object_id or str(uuid.uuid5(uuid.NAMESPACE_URL, "object/" + client_id))
    resource_id = resource_id or ("/subscriptions/00000000-0000-0000-0000-000000000000/"
                                  "resourceGroups/standin/providers/Microsoft.ManagedIdentity/"
                                  f"userAssignedIdentities/{client_id}")
    return _Identity(client_id, object_id, resource_id)


def _error(status: int, error: str, description: str,
           headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return json_reply(status, {"error": error, "error_description": description}, headers)
