"""Frozen values that travel between the engine's parts: the parsed settings and sync results.

No I/O. Raw settings dicts never travel past `akvvm_ext.settings`; everything else sees these.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_STORE = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store"
DEFAULT_POLLING_INTERVAL_S = 3600


@dataclass(frozen=True)
class AclGrant:
    """Read access for one user and/or group (names or numeric ids, as written)."""

    user: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class ObservedCertificate:
    """One observed certificate, fully resolved: where it comes from and where it goes."""

    url: str  # as written, normalised: https://host[:port]/secrets/name[/version]
    vault_url: str  # https://host[:port]
    vault_name: str  # first DNS label of the host, as written
    secret_name: str
    version: str | None  # pinned version, or None for "latest"
    store_dir: str  # absolute
    link_name: str  # customSymbolicLinkName or "<vault>.<name>"
    acls: tuple[AclGrant, ...] = ()
    relaxed_challenge: bool = False  # host allowed by additionalVaultDnsSuffixes

    @property
    def file_prefix(self) -> str:
        """Version files are named `<prefix>.<version>`."""
        return f"{self.vault_name}.{self.secret_name}"

    def wants(self, version: str) -> bool:
        """Whether `version` is what this certificate asks for: any, or its pin (Key Vault's ids
        are lower-case; a pin may be written in capitals)."""
        return self.version is None or version.lower() == self.version.lower()


@dataclass(frozen=True)
class Identity:
    """Which managed identity to use. All None: azure-identity's own defaults, unchanged."""

    msi_endpoint: str | None = None  # as written (IMDS or Arc form)
    msi_client_id: str | None = None


@dataclass(frozen=True)
class LoggingTarget:
    """Where fluentd listens: tcp host/port or a unix socket path."""

    servicename: str
    host: str | None = None
    port: int | None = None
    unix_path: str | None = None


@dataclass(frozen=True)
class Settings:
    """The effective settings of the extension."""

    observed: tuple[ObservedCertificate, ...]
    polling_interval_s: int = DEFAULT_POLLING_INTERVAL_S
    require_initial_sync: bool = False
    acl_enabled: bool = True
    identity: Identity = field(default_factory=Identity)
    logging: LoggingTarget | None = None
    notes: tuple[str, ...] = ()  # warnings/notes found while parsing (never fatal)


class Outcome(str, enum.Enum):
    """What a sync pass did for one certificate."""

    INSTALLED = "installed"  # a new version file was written and/or the link moved
    UNCHANGED = "unchanged"  # everything on disk already matched
    FAILED = "failed"  # fetch, parse or write failed; what was installed is untouched


@dataclass(frozen=True)
class CertResult:
    """The result of one sync pass for one observed certificate."""

    url: str
    outcome: Outcome
    version: str | None = None  # version now served (None: nothing installed yet)
    path: str | None = None  # the version file behind the link
    link: str | None = None  # the stable link path
    not_after: str | None = None  # ISO 8601 UTC of the leaf's notAfter
    error: str | None = None  # a user-readable reason with hint, when FAILED
    error_kind: str | None = None  # AkvvmError.code of the failure
    retryable: bool = False
    retry_after: float | None = None
    warnings: tuple[str, ...] = ()  # e.g. expired certificate, dropped unrelated certs
