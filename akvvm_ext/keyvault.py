"""Key Vault access: one SecretClient per vault, reused across cycles; SDK errors become FetchError.

No token and no secret value ever reaches a message; the hints say what the admin can do.
"""
from __future__ import annotations

import email.utils
import json
import logging
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from azure.core.credentials import TokenCredential
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    DeserializationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.identity import CredentialUnavailableError
from azure.keyvault.secrets import KeyVaultSecret, SecretClient

from .errors import FetchError
from .model import ObservedCertificate

log = logging.getLogger("akvvm.keyvault")

# The service backs off itself (backoff.py, with Retry-After), so the SDK must not sleep on
# 429/5xx. It retries once, at once, only a broken connection (a pooled keep-alive connection
# the server dropped during a long polling interval is the common case).
SDK_RETRY = {"retry_total": 1, "retry_status": 0, "retry_connect": 1, "retry_read": 1}
CONNECTION_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
WARM_WAIT_S = 1.0

ROLE_HINT = (
    "The VM's managed identity needs the 'Key Vault Secrets User' role on vault {vault} "
    "(or a 'get' secret access policy); RBAC assignments can take minutes to propagate."
)
FIREWALL_HINT = (
    "Vault {vault}'s network rules refuse this VM's address: allow the VM's subnet or public "
    "address in the vault's firewall, or reach the vault through its private endpoint."
)
IDENTITY_HINT = (
    "Check that a managed identity is assigned to the VM; with user-assigned identities set "
    "authenticationSettings.msiClientId to the client id of the one to use."
)
NO_IMDS_HINT = (
    "Check authenticationSettings.msiEndpoint (default: IMDS at 169.254.169.254) and that the "
    "VM reaches it directly, without a proxy; retrying."
)
MAX_DETAIL = 300
_JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")
_QUOTED = re.compile(r"'([^']{1,100})'")
_FIRST_SENTENCE = re.compile(r"^(.+?[.!])(\s|$)")


@dataclass(frozen=True)
class Secret:
    """One secret version as Key Vault returned it. `value` is never part of repr()."""

    value: str = field(repr=False)
    content_type: str | None
    version: str
    id: str
    enabled: bool | None = None
    managed: bool = False
    created: datetime | None = None
    updated: datetime | None = None


@dataclass
class _Client:
    """A SecretClient and whether a request has gone through it yet (see `Vaults._get`)."""

    client: SecretClient
    lock: threading.Lock = field(default_factory=threading.Lock)
    warm: bool = False


class Vaults:
    """The SecretClients of one service, created lazily per vault URL and reused."""

    def __init__(self, credential: TokenCredential, **client_options: Any) -> None:
        """`client_options` go to every SecretClient (e.g. `connection_verify`, `transport`)."""
        self._credential = credential
        self._options: dict[str, Any] = {
            **SDK_RETRY,
            "connection_timeout": CONNECTION_TIMEOUT_S,
            "read_timeout": READ_TIMEOUT_S,
            **client_options,
        }
        self._clients: dict[tuple[str, bool], _Client] = {}
        self._lock = threading.Lock()

    def fetch(self, cert: ObservedCertificate) -> Secret:
        """Get the latest (or the pinned) version of `cert`'s secret; raise FetchError."""
        try:  # the SDK reads the answer's fields lazily: _secret may be what finds them broken
            return _secret(self._get(cert), cert)
        except Exception as exc:  # noqa: BLE001 -- every SDK failure becomes one FetchError
            raise translate(exc, cert) from None

    def client(self, cert: ObservedCertificate) -> SecretClient:
        """The SecretClient for `cert`'s vault (listing uses it; see `listing.ChangeDetector`)."""
        return self._client(cert).client

    def close(self) -> None:
        """Close every client's connections."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for entry in clients:
            entry.client.close()

    def _client(self, cert: ObservedCertificate) -> _Client:
        key = (cert.vault_url, cert.relaxed_challenge)
        with self._lock:
            if key not in self._clients:
                client = SecretClient(
                    cert.vault_url,
                    self._credential,
                    verify_challenge_resource=not cert.relaxed_challenge,
                    **self._options,
                )
                self._clients[key] = _Client(client)
                log.debug("client for vault %s%s", cert.vault_url,
                          " (challenge resource check relaxed)" if cert.relaxed_challenge else "")
            return self._clients[key]

    def _get(self, cert: ObservedCertificate) -> KeyVaultSecret:
        entry = self._client(cert)
        # The first request to a vault carries the 401 challenge: let one thread do it, so that
        # parallel workers don't each send an unauthenticated request. The others wait for it
        # at most WARM_WAIT_S, so a slow first certificate cannot hold the rest back.
        if not entry.warm and entry.lock.acquire(timeout=WARM_WAIT_S):
            try:
                if not entry.warm:
                    try:
                        return entry.client.get_secret(cert.secret_name, cert.version)
                    finally:
                        entry.warm = True
            finally:
                entry.lock.release()
        return entry.client.get_secret(cert.secret_name, cert.version)


def _secret(found: KeyVaultSecret, cert: ObservedCertificate) -> Secret:
    props = found.properties
    if found.value is None or not props.version:
        raise FetchError("Key Vault returned no value", status=200, retryable=True)
    return Secret(
        value=found.value,
        content_type=props.content_type,
        version=props.version,
        id=props.id or cert.url,
        enabled=props.enabled,
        managed=bool(props.managed),
        created=props.created_on,
        updated=props.updated_on,
    )


def translate(exc: BaseException, cert: ObservedCertificate) -> FetchError:
    """Turn an SDK/identity/transport failure into a FetchError with a hint. No I/O."""
    err = _translate(exc, cert)
    if err.message and err.message[-1] not in ".!?":
        err.message += "."
    return err


def _translate(exc: BaseException, cert: ObservedCertificate) -> FetchError:
    if isinstance(exc, FetchError):
        return exc
    if isinstance(exc, CredentialUnavailableError) or (
        isinstance(exc, ClientAuthenticationError) and exc.status_code is None
    ):
        return _identity_error(exc)
    if isinstance(exc, (DecodeError, DeserializationError, json.JSONDecodeError)):
        return FetchError(
            "the answer from Key Vault was not the JSON it sends (a proxy or firewall page?)",
            "Check HTTPS_PROXY/NO_PROXY and any filtering proxy between the VM and the vault; "
            "retrying.", retryable=True)
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        return _http_error(exc, cert)
    if isinstance(exc, (ServiceRequestError, ServiceResponseError)):
        return FetchError(
            f"cannot reach vault {cert.vault_name} ({_cause(exc)})",
            "Check DNS, firewalls, HTTPS_PROXY/NO_PROXY and REQUESTS_CA_BUNDLE; retrying.",
            retryable=True,
        )
    if isinstance(exc, ValueError) and "challenge" in str(exc).lower():
        return _challenge_error(exc, cert)  # it names a resource that is not this vault
    return FetchError(f"fetching the secret from vault {cert.vault_name} failed ({_cause(exc)})",
                      retryable=isinstance(exc, AzureError))


def _challenge_error(exc: ValueError, cert: ObservedCertificate) -> FetchError:
    named = _QUOTED.search(str(exc))
    return FetchError(
        f"vault {cert.vault_name} sent an authentication challenge for another resource"
        + (f" ({named.group(1)})" if named else ""),
        "Check the vault URL; a host outside the Azure Key Vault DNS suffixes must be listed "
        "in additionalVaultDnsSuffixes.",
    )


def _identity_error(exc: BaseException) -> FetchError:
    """azure-identity says "no response from the IMDS endpoint" for every failure; say which."""
    detail = _detail(exc)
    _, answered, said = detail.partition("Token request error:")
    if answered:
        lowered = said.lower()
        unknown = "identity" in lowered and ("not found" in lowered or "no " in lowered)
        hint = IDENTITY_HINT if unknown else "The endpoint is busy or restarting; retrying."
        return FetchError(f"the managed identity endpoint refused a token: {said.strip()}",
                          hint, retryable=True)
    if "no response from the IMDS endpoint" in detail:
        return FetchError("no response from the managed identity endpoint", NO_IMDS_HINT,
                          retryable=True)
    return FetchError(f"no token from the managed identity endpoint: {detail}", IDENTITY_HINT,
                      retryable=True)


def _http_error(exc: HttpResponseError, cert: ObservedCertificate) -> FetchError:
    status = int(exc.status_code or 0)
    code, message = _service_error(exc)
    said = f"Key Vault answered {status}" + (f" {code}" if code else "")
    said += f": {message}" if message else ""
    if status == 401:
        hint = "The token was rejected. " + IDENTITY_HINT
        return FetchError(said, hint, status=status, retryable=True)
    if status == 403:
        hint = ROLE_HINT.format(vault=cert.vault_name)
        if "firewall" in code.lower() or "client address is not authorized" in message.lower():
            hint = FIREWALL_HINT.format(vault=cert.vault_name)
        elif "disabled" in message.lower():
            hint = "This secret version is disabled in Key Vault; enable it or pin another one."
        return FetchError(said, hint, status=status, retryable=True)
    if status == 404:
        return FetchError(said, _not_found_hint(cert), status=status, retryable=True)
    retry_after = _retry_after(exc)
    retryable = status in (408, 429) or status >= 500
    hint = "Key Vault is throttling this identity; retrying later." if status == 429 else ""
    return FetchError(said, hint, status=status, retryable=retryable, retry_after=retry_after)


def _not_found_hint(cert: ObservedCertificate) -> str:
    if cert.version:
        return (f"Version {cert.version} of secret {cert.secret_name} does not exist in vault "
                f"{cert.vault_name}; check the pinned version in the URL.")
    return (f"Secret {cert.secret_name} does not exist in vault {cert.vault_name}; check the "
            "name (use the certificate's name with /secrets/, not /certificates/).")


def _service_error(exc: HttpResponseError) -> tuple[str, str]:
    """Key Vault's own error code and message, if the body had them."""
    error = getattr(exc, "error", None)
    code = str(getattr(error, "code", "") or "")
    inner = getattr(error, "innererror", None)
    if isinstance(inner, dict) and inner.get("code"):
        code += f"/{inner['code']}"
    message = _clean(str(getattr(error, "message", "") or "").split("\n")[0])
    first = _FIRST_SENTENCE.match(message)
    return _clean(code)[:80], first.group(1) if first else message


def _retry_after(exc: HttpResponseError) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or HTTP-date), if there was one."""
    headers = getattr(exc.response, "headers", None) or {}
    raw = headers.get("Retry-After")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


# What broke, from the exception's chain, in fixed words: never the exception's own text, which
# can quote the vault's answer (a broken chunked body begins with the secret's value).
_CAUSES = (  # (part of an exception class name in the chain, what to say), first match wins
    ("gaierror", "its host name does not resolve"),
    ("NameResolution", "its host name does not resolve"),
    ("ConnectionRefused", "connection refused"),
    ("ProxyError", "the proxy failed"),
    ("SSLCertVerification", "its TLS certificate is not trusted"),
    ("SSL", "TLS failed"),
    ("Timeout", "timed out"),
    ("ConnectionReset", "the connection was reset"),
    ("InvalidChunkLength", "the answer was cut or garbled"),
    ("IncompleteRead", "the answer was cut short"),
    ("RemoteDisconnected", "the server closed the connection"),
    ("BadStatusLine", "the answer was garbled"),
    ("ProtocolError", "the connection broke"),
)


def _cause(exc: BaseException) -> str:
    """A fixed description of a transport failure, or the exception's class name."""
    chain: list[BaseException] = []
    current: object = exc
    while isinstance(current, BaseException) and current not in chain and len(chain) < 12:
        chain.append(current)
        current = (current.__cause__ or current.__context__
                   or getattr(current, "inner_exception", None) or getattr(current, "reason", None))
    names = [klass.__name__ for error in chain for klass in type(error).__mro__]
    for part, words in _CAUSES:
        if any(part in name for name in names):
            return words
    return type(exc).__name__


def _detail(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return _clean(str(message)) or type(exc).__name__


def _clean(text: str) -> str:
    """One short line, with anything shaped like a token removed."""
    one_line = " ".join(_JWT.sub("<redacted>", text).split())
    return one_line[:MAX_DETAIL] + ("…" if len(one_line) > MAX_DETAIL else "")
