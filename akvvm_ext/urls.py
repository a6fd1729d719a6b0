"""The URLs the settings name: observed secrets, the identity endpoint and the fluentd endpoint.

No I/O. Each check raises `UrlProblem(problem, hint)` worded for the user; URLs are not secret.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from akvvm_ext.errors import AkvvmError

# Key Vault and Managed HSM DNS suffixes of the public and sovereign Azure clouds.
KEY_VAULT_SUFFIXES = (
    "vault.azure.net",
    "vault.azure.cn",
    "vault.usgovcloudapi.net",
    "vault.microsoftazure.de",
    "managedhsm.azure.net",
    "managedhsm.azure.cn",
    "managedhsm.usgovcloudapi.net",
    "managedhsm.microsoftazure.de",
)
SECRET_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
VERSION = re.compile(r"[0-9A-Fa-f]{32}")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?")
_EXAMPLE = "https://<vault>.vault.azure.net/secrets/<name>"
_IDENTITY_PATHS = ("", "/metadata/identity", "/metadata/identity/oauth2/token")
DEFAULT_FLUENTD_PORT = 24224


class UrlProblem(AkvvmError):
    """A URL in the settings is not acceptable; message and hint say why and what to write."""

    code = "SETTINGS"


@dataclass(frozen=True)
class SecretUrl:
    """A Key Vault secret URL taken apart."""

    url: str  # https://<host as written>[:port]/secrets/<name>[/<version>]
    vault_url: str
    vault_name: str  # first DNS label of the host, as written
    name: str
    version: str | None
    relaxed_challenge: bool  # the host matched only an additional suffix


def secret_url(text: str, extra_suffixes: Sequence[str] = ()) -> SecretUrl:
    """Check and take apart the URL of an observed certificate's secret."""
    parts = _split(text)
    if parts.scheme != "https":
        raise UrlProblem("is not an https URL", f"Key Vault is reached over https only: {_EXAMPLE}")
    host = _host(parts)
    relaxed = _vault_host(host, extra_suffixes)
    name, version = _secret_path(parts.path, parts.netloc)
    url = f"https://{parts.netloc}/secrets/{name}" + (f"/{version}" if version else "")
    return SecretUrl(url, f"https://{parts.netloc}", host.split(".")[0], name, version, relaxed)


def _split(text: str) -> SplitResult:
    if text != text.strip():
        raise UrlProblem("has spaces around it", "Remove them")
    if "<" in text or ">" in text:
        raise UrlProblem(
            "still holds a documentation placeholder (<...>)",
            "Replace it with your vault and certificate names, e.g. "
            "https://myvault.vault.azure.net/secrets/mycertificate1",
        )
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as err:
        raise UrlProblem("is not a valid URL (bad host or port)", f"Write {_EXAMPLE}") from err
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise UrlProblem("has a query string or fragment", "Remove everything from '?' or '#' on")
    return parts


def _host(parts: SplitResult) -> str:
    """The host as written (case kept), without port; refuses user info and non-DNS names."""
    if not parts.hostname:
        raise UrlProblem("has no host", f"Write {_EXAMPLE}")
    if "@" in parts.netloc:
        raise UrlProblem("carries a user name or password", "Remove the part up to '@'")
    host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    if host.endswith(":"):
        host = host[:-1]
    if not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise UrlProblem("has a host that is not a DNS name", f"Write {_EXAMPLE}")
    return host


def _vault_host(host: str, extra_suffixes: Sequence[str]) -> bool:
    """Whether only an additional suffix allows `host` (relaxed challenge); raise if none does."""
    lower = host.lower()
    if any(lower.endswith("." + suffix) for suffix in KEY_VAULT_SUFFIXES):
        return False
    for suffix in extra_suffixes:
        suffix = suffix.lower().lstrip(".")
        if lower == suffix or lower.endswith("." + suffix):
            return True
    raise UrlProblem(
        "has a host that is not a Key Vault host",
        "Use your vault's DNS name, e.g. myvault.vault.azure.net; for Azure Stack Hub or a private "
        "cloud add its DNS suffix to secretsManagementSettings.additionalVaultDnsSuffixes",
    )


def _secret_path(path: str, netloc: str) -> tuple[str, str | None]:
    segments = path.split("/")[1:]
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # one trailing slash is harmless
    kind = segments[0].lower() if segments else ""
    if kind == "certificates" and len(segments) in (2, 3):
        rest = "/".join(segments[1:])
        raise UrlProblem(
            "points at /certificates/, which returns no private key",
            f"Observe the certificate's secret instead: https://{netloc}/secrets/{rest}",
        )
    if kind != "secrets" or len(segments) not in (2, 3):
        raise UrlProblem(
            "has a path other than /secrets/<name> or /secrets/<name>/<version>",
            f"Write {_EXAMPLE}",
        )
    name, version = segments[1], (segments[2] if len(segments) == 3 else None)
    if not SECRET_NAME.fullmatch(name):
        raise UrlProblem(
            "has an invalid secret name", "Names are 1-127 letters, digits and dashes"
        )
    if version is not None and not VERSION.fullmatch(version):
        raise UrlProblem(
            "has an invalid version",
            "A version is 32 hex digits; leave it out to follow the newest",
        )
    return name, version


def identity_endpoint(text: str) -> list[str]:
    """Check an msiEndpoint; return notes (e.g. an ignored query string)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as err:
        raise UrlProblem("is not a valid URL (bad host or port)", "") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlProblem("must be an http(s) URL with a host", "")
    if parts.username is not None or parts.password is not None:
        raise UrlProblem("must not carry a user name or password",
                         "The endpoint takes none; remove the part before '@'.")
    if parts.port == 0 or parts.netloc.endswith(":"):
        raise UrlProblem("has an empty or zero port", "Give the port the endpoint listens on, "
                         "or none for the default.")
    if parts.path.rstrip("/") not in _IDENTITY_PATHS:
        raise UrlProblem(
            "has a path other than /metadata/identity or /metadata/identity/oauth2/token", ""
        )
    if parts.query or parts.fragment:
        return ["has a query string, which is ignored (only scheme, host and port are used)"]
    return []


def fluentd_endpoint(text: str) -> tuple[str | None, int | None, str | None]:
    """(host, port, unix socket path) of `tcp://host[:port]` or `unix:///path`."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise UrlProblem("is not a valid URL (bad host or port)", "") from err
    if parts.scheme == "unix" and not parts.netloc and parts.path.startswith("/"):
        return None, None, parts.path
    if parts.scheme == "tcp" and parts.hostname and parts.path in ("", "/"):
        return parts.hostname, port or DEFAULT_FLUENTD_PORT, None
    raise UrlProblem("is not a tcp://host:port or unix:///path endpoint", "")
