"""The VM's managed identity as an azure-identity credential, pointed at the configured endpoint.

`credential()` is the one place in the engine that writes environment variables (see `apply`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.identity import CredentialUnavailableError, ManagedIdentityCredential

from .model import Identity

log = logging.getLogger("akvvm.identity")
_T = TypeVar("_T")

IMDS_ORIGIN = "http://169.254.169.254"  # azure-identity's default when nothing is configured
ARC_PORT = 40342  # the Azure Arc agent (HIMDS) listens on localhost:40342
MSI_PATH = "/metadata/identity/oauth2/token"  # Arc: IDENTITY_ENDPOINT is the full URL
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})

# azure-identity picks its flow from these; an explicit msiEndpoint must not be overridden by them.
POD_HOST = "AZURE_POD_IDENTITY_AUTHORITY_HOST"  # IMDS flow: scheme://host[:port], nothing more
ARC_VARS = ("IDENTITY_ENDPOINT", "IMDS_ENDPOINT")  # Arc flow: both set, no IDENTITY_HEADER
OTHER_FLOWS = ("IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET")  # App Service, Azure ML
PROXY_BYPASS = ("NO_PROXY", "no_proxy")  # requests reads no_proxy first, then NO_PROXY
ENV_KEYS = (POD_HOST, *ARC_VARS, *OTHER_FLOWS, *PROXY_BYPASS)

COOLDOWN_S = 5.0  # like MSAL's own replay of a 429/5xx answer

# azure-identity's own IMDS retry (5 retries on 404/410/429/5xx); only scaled, never replaced.
IMDS_BACKOFF_FACTOR = 0.8
IMDS_BACKOFF_MAX = 60.0


@dataclass(frozen=True)
class Endpoint:
    """Where the token comes from: an IMDS-style endpoint or the Azure Arc agent."""

    kind: Literal["imds", "arc"]
    origin: str  # scheme://host[:port]
    host: str


def endpoint(msi_endpoint: str, *, arc_port: int = ARC_PORT) -> Endpoint:
    """Classify an msiEndpoint as written (`…/metadata/identity[/oauth2/token]`). No I/O."""
    parts = urlsplit(msi_endpoint.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"msiEndpoint {msi_endpoint!r} is not an http(s) URL with a host")
    origin = f"{parts.scheme}://{parts.netloc}"
    arc = parts.hostname in LOOPBACK and parts.port == arc_port
    return Endpoint("arc" if arc else "imds", origin, parts.hostname)


def environment(
    identity: Identity, current: Mapping[str, str], *, arc_port: int = ARC_PORT
) -> dict[str, str | None]:
    """The environment changes `identity` needs (None = remove). No I/O.

    Without an msiEndpoint only the proxy bypass is added: azure-identity's defaults and the
    standard variables already in the environment stay as they are.
    """
    changes: dict[str, str | None] = {}
    if identity.msi_endpoint:
        target = endpoint(identity.msi_endpoint, arc_port=arc_port)
        changes.update(dict.fromkeys((k for k in OTHER_FLOWS if k in current), None))
        if target.kind == "arc":
            changes.update({ARC_VARS[0]: target.origin + MSI_PATH, ARC_VARS[1]: target.origin})
        else:
            changes.update(dict.fromkeys((k for k in ARC_VARS if k in current), None))
            changes[POD_HOST] = target.origin
        hosts = [target.host]
    else:
        hosts = _default_hosts(current)
    bypass = _no_proxy(current, hosts)
    if bypass is not None:
        changes.update(dict.fromkeys(PROXY_BYPASS, bypass))
    return changes


def _default_hosts(current: Mapping[str, str]) -> list[str]:
    """The hosts azure-identity talks to when left to its defaults."""
    origins = [current.get(POD_HOST) or IMDS_ORIGIN]
    if all(current.get(k) for k in ARC_VARS):
        origins.append(current[ARC_VARS[0]])
    return [h for h in (urlsplit(o).hostname for o in origins) if h]


def _no_proxy(current: Mapping[str, str], hosts: list[str]) -> str | None:
    """The merged no-proxy list, or None when every host is already in it."""
    existing = current.get("no_proxy") or current.get("NO_PROXY") or ""
    entries = [e.strip() for e in existing.split(",") if e.strip()]
    missing = [h for h in hosts if h not in entries]
    if not missing and current.get("no_proxy") == current.get("NO_PROXY"):
        return None
    return ",".join(entries + missing)


def switch(
    identity: Identity,
    environ: MutableMapping[str, str],
    written: dict[str, tuple[str | None, str | None]],
    *,
    arc_port: int = ARC_PORT,
) -> None:
    """Point `environ` at `identity`, first undoing what the previous call `written` there (key ->
    (value before, value written)) where it is still in place: a reload that drops an msiEndpoint
    or moves Arc -> IMDS leaves nothing of the old endpoint behind, and a variable someone else
    changed since is left alone."""
    for key, (before, after) in written.items():
        if environ.get(key) == after:
            apply({key: before}, environ)
    written.clear()
    changes = environment(identity, environ, arc_port=arc_port)
    written.update({k: (environ.get(k), v) for k, v in changes.items() if environ.get(k) != v})
    apply(changes, environ)


def apply(changes: Mapping[str, str | None], environ: MutableMapping[str, str]) -> None:
    """Write `changes` into `environ` (os.environ in the service): the engine's only env writer.

    azure-identity and MSAL read these variables on every token request, so they stay set for
    the life of the process.
    """
    for key, value in changes.items():
        if value is None:
            if environ.pop(key, None) is not None:
                log.info("identity: unset %s", key)
        elif environ.get(key) != value:
            environ[key] = value


# What `credential()` changed in os.environ, for the next call (a reload) to undo.
_WRITTEN: dict[str, tuple[str | None, str | None]] = {}


def credential(
    identity: Identity, *, arc_port: int = ARC_PORT, backoff_scale: float = 1.0, **options: Any
) -> SerializedCredential:
    """The credential for the whole service: one per process, tokens cached by MSAL.

    `options` go to ManagedIdentityCredential unchanged (tests pass retry settings); with none and
    `backoff_scale` 1, azure-identity's own retry policy applies as it is. `backoff_scale`
    (AKVVM_BACKOFF_SCALE) also scales the cool-down after a failed token request.
    """
    switch(identity, os.environ, _WRITTEN, arc_port=arc_port)
    if backoff_scale != 1.0:
        options.setdefault("retry_backoff_factor", IMDS_BACKOFF_FACTOR * backoff_scale)
        options.setdefault("retry_backoff_max", IMDS_BACKOFF_MAX * backoff_scale)
    log.info("using the %s", describe(identity, arc_port=arc_port))
    inner = ManagedIdentityCredential(client_id=identity.msi_client_id, **options)
    return SerializedCredential(inner, COOLDOWN_S * backoff_scale)


def describe(identity: Identity, *, arc_port: int = ARC_PORT) -> str:
    """One line for the log: which identity, through which endpoint. No I/O."""
    who = f"user-assigned {identity.msi_client_id}" if identity.msi_client_id else "system-assigned"
    if not identity.msi_endpoint:
        return f"{who} managed identity, azure-identity defaults"
    target = endpoint(identity.msi_endpoint, arc_port=arc_port)
    flow = "Azure Arc" if target.kind == "arc" else "IMDS"
    return f"{who} managed identity via {flow} at {target.origin}"


class SerializedCredential:
    """One token request at a time, and no stampede after a failure.

    Concurrent first fetches wait for one IMDS call, then hit MSAL's cache. A failed call is
    handed to everyone who was waiting for it and to every caller for `cooldown_s` after it,
    so an unreachable IMDS (azure-identity retries ~24 s per call) costs one call per pass,
    not one per certificate.
    """

    def __init__(self, inner: ManagedIdentityCredential, cooldown_s: float = COOLDOWN_S) -> None:
        self._inner = inner
        self._cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._failure: tuple[float, Exception] | None = None  # (monotonic end, error)

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """Delegate to azure-identity, serialized."""
        def ask() -> AccessToken:
            token: AccessToken = self._inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )
            return token
        return self._serialized(ask)

    def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """Delegate to azure-identity, serialized."""
        def ask() -> AccessTokenInfo:
            info: AccessTokenInfo = self._inner.get_token_info(*scopes, options=options)
            return info
        return self._serialized(ask)

    def _serialized(self, ask: Callable[[], _T]) -> _T:
        asked_at = time.monotonic()
        with self._lock:
            if self._failure is not None:
                ended, error = self._failure
                if ended >= asked_at or time.monotonic() - ended < self._cooldown_s:
                    raise CredentialUnavailableError(message=str(error)) from error
            try:
                result = ask()
            except Exception as error:
                self._failure = (time.monotonic(), error)
                raise
            self._failure = None
            return result

    def close(self) -> None:
        """Close the identity transport."""
        self._inner.close()

    def __enter__(self) -> SerializedCredential:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
