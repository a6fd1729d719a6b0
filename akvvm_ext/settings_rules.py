"""The rules beyond the schema: observed certificates, link names, identity and fluentd target.

No I/O. Each rule reads values the schema already found well-typed and records problems or notes
in `Findings`; values are never echoed.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field, replace
from typing import Any

from akvvm_ext import schema, urls
from akvvm_ext.model import AclGrant, Identity, LoggingTarget, ObservedCertificate
from akvvm_ext.schema import Path

OBSERVED: Path = ("secretsManagementSettings", "observedCertificates")
AUTH: Path = ("authenticationSettings",)
LOGGING: Path = ("loggingSettings",)
DEFAULT_SERVICENAME = "akvvm_service"
_VERSION_FILE = re.compile(r"(.+)\.[0-9a-f]{32}")
_GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
LINK_NAME_MAX_BYTES = 233  # 255 minus the temp link's '.' and '.lnk-<16 hex>'


@dataclass
class Findings:
    """Problems and notes collected while parsing; `bad` holds paths that already have a problem."""

    bad: set[Path] = field(default_factory=set)
    located: list[tuple[Path, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """The problem sentences in document order."""
        ordered = sorted(self.located, key=lambda entry: schema.document_order(entry[0]))
        return [text for _, text in ordered]

    def ok(self, path: Path) -> bool:
        """True when neither `path` nor any of its ancestors has a problem."""
        return not any(path[:i] in self.bad for i in range(len(path) + 1))

    def problem(self, path: Path, text: str, hint: str = "") -> None:
        """Record a problem at `path`."""
        self.bad.add(path)
        self.located.append((path, schema.sentence(path, text, hint)))

    def note(self, path: Path, text: str, hint: str = "") -> None:
        """Record a note (never fatal) at `path`."""
        self.notes.append(schema.sentence(path, text, hint))

    def value(self, obj: dict[str, Any], path: Path, kind: type) -> Any:
        """`obj[path[-1]]` when present, of `kind` and without a problem; else None."""
        found = obj.get(str(path[-1]))
        return found if isinstance(found, kind) and self.ok(path) else None


def store_dir(value: str, path: Path, found: Findings) -> str | None:
    """The normalised absolute store directory, or None after recording a problem."""
    if "\0" in value:
        found.problem(path, "contains a NUL character", "Remove it")
        return None
    normal = posixpath.normpath(value)  # keeps a leading '//', which Linux reads as '/'
    return "/" + normal.lstrip("/") if normal.startswith("//") else normal


def certificates(
    sms: dict[str, Any], default_store: str, acl_enabled: bool, found: Findings
) -> tuple[ObservedCertificate, ...]:
    """The observed certificates, checked one by one and then against each other."""
    items = found.value(sms, OBSERVED, list)
    if items is None:
        return ()
    if not items:
        found.note(OBSERVED, "is empty: nothing will be observed")
    suffixes = _suffixes(sms, found)
    placed: list[tuple[Path, ObservedCertificate]] = []
    _note_store_names(items, found)
    for index, item in enumerate(items):
        path = (*OBSERVED, index)
        cert = _certificate(item, path, default_store, suffixes, found) if found.ok(path) else None
        if cert is not None:
            placed.append((path, cert))
    _collisions(placed, found)
    if not acl_enabled:
        placed = _without_acls(placed, found)
    return tuple(cert for _, cert in placed)


def _without_acls(
    placed: list[tuple[Path, ObservedCertificate]], found: Findings
) -> list[tuple[Path, ObservedCertificate]]:
    """aclEnabled false: acls stay validated but are dropped, with one note."""
    given = [path for path, cert in placed if cert.acls]
    if given:
        also = f" (nor those of {len(given) - 1} more certificate(s))" if len(given) > 1 else ""
        found.note((*given[0], "acls"), f"is not applied because aclEnabled is false{also}")
    return [(path, replace(cert, acls=())) for path, cert in placed]


def _note_store_names(items: list[Any], found: Findings) -> None:
    """One note for the Windows-only per-certificate certificateStoreName, however often given."""
    given = [i for i, item in enumerate(items) if isinstance(item, dict)
             and "certificateStoreName" in item]
    if given:
        also = f" (also in {len(given) - 1} more certificate(s))" if len(given) > 1 else ""
        found.note((*OBSERVED, given[0], "certificateStoreName"), f"is ignored on Linux{also}")


def _suffixes(sms: dict[str, Any], found: Findings) -> tuple[str, ...]:
    base: Path = ("secretsManagementSettings", "additionalVaultDnsSuffixes")
    listed = found.value(sms, base, list) or []
    return tuple(s for i, s in enumerate(listed) if isinstance(s, str) and found.ok((*base, i)))


def _certificate(
    item: object, path: Path, default_store: str, suffixes: tuple[str, ...], found: Findings
) -> ObservedCertificate | None:
    entry: dict[str, Any] = {"url": item} if isinstance(item, str) else dict(item)  # type: ignore[call-overload]
    url_path = path if isinstance(item, str) else (*path, "url")
    before = len(found.located)
    secret = _secret(entry, url_path, suffixes, found)
    store = default_store
    custom = found.value(entry, (*path, "certificateStoreLocation"), str)
    if custom is not None:
        store = store_dir(custom, (*path, "certificateStoreLocation"), found) or default_store
    link = _link_name(entry, (*path, "customSymbolicLinkName"), found)
    acls = _acls(entry, (*path, "acls"), found)
    if secret is None or len(found.located) > before:
        return None
    return ObservedCertificate(
        url=secret.url, vault_url=secret.vault_url, vault_name=secret.vault_name,
        secret_name=secret.name, version=secret.version, store_dir=store,
        link_name=link or f"{secret.vault_name}.{secret.name}", acls=acls,
        relaxed_challenge=secret.relaxed_challenge,
    )


def _secret(
    entry: dict[str, Any], path: Path, suffixes: tuple[str, ...], found: Findings
) -> urls.SecretUrl | None:
    text = entry.get("url")
    if not isinstance(text, str) or not found.ok(path):
        return None
    try:
        return urls.secret_url(text, suffixes)
    except urls.UrlProblem as err:
        found.problem(path, err.message, err.hint)
        return None


def _link_name(entry: dict[str, Any], path: Path, found: Findings) -> str | None:
    name: str | None = found.value(entry, path, str)
    if name is None:
        return None
    if "/" in name or "\0" in name or name in (".", ".."):
        found.problem(path, "is not a single file name (no '/', NUL, '.' or '..')",
                      schema.hint_for("observedCertificate", "customSymbolicLinkName"))
        return None
    if len(name.encode()) > LINK_NAME_MAX_BYTES:  # the link is made as `.<name>.lnk-<16 hex>`
        found.problem(path, f"is longer than {LINK_NAME_MAX_BYTES} bytes in UTF-8",
                      "Use a shorter name: the store adds a 22-byte temporary suffix while it "
                      "moves the link, and file names end at 255 bytes")
        return None
    return name


def _acls(entry: dict[str, Any], path: Path, found: Findings) -> tuple[AclGrant, ...]:
    grants: list[AclGrant] = []
    for index, item in enumerate(found.value(entry, path, list) or []):
        where = (*path, index)
        if not isinstance(item, dict) or not found.ok(where):
            continue
        user, group = item.get("user"), item.get("group")
        if user is None and group is None:
            found.problem(where, "names neither a user nor a group",
                          'Give "user", "group" or both, e.g. {"user": "app1"}')
            continue
        grants.append(AclGrant(_principal(user), _principal(group)))
    return tuple(grants)


def _principal(value: object) -> str | None:
    """A user/group as text; numeric ids as plain decimals (1000.0 in JSON is 1000)."""
    if value is None:
        return None
    return str(int(value)) if isinstance(value, (int, float)) else str(value)


def _collisions(placed: list[tuple[Path, ObservedCertificate]], found: Findings) -> None:
    """Two certificates may not share a link or version-file names in one store directory."""
    links: dict[tuple[str, str], Path] = {}
    prefixes: dict[tuple[str, str], Path] = {}
    for path, cert in placed:
        link_key = (cert.store_dir, cert.link_name)
        prefix_key = (cert.store_dir, cert.file_prefix.lower())
        if link_key in links:
            found.problem(path, f"uses the link {posixpath.join(*link_key)} like "
                          f"{schema.json_path(links[link_key])}",
                          "Give each certificate its own customSymbolicLinkName or store directory")
        elif prefix_key in prefixes:
            found.problem(path, f"would write the same version files {cert.file_prefix}.<version> "
                          f"in {cert.store_dir} as {schema.json_path(prefixes[prefix_key])}",
                          "Observe each secret once per store directory, or give one of them "
                          "another certificateStoreLocation")
        links.setdefault(link_key, path)
        prefixes.setdefault(prefix_key, path)
    for path, cert in placed:
        looks_versioned = _VERSION_FILE.fullmatch(cert.link_name.lower())
        other = looks_versioned and prefixes.get((cert.store_dir, looks_versioned.group(1)))
        if other:
            found.problem((*path, "customSymbolicLinkName"), "has the name of a version file "
                          f"of {schema.json_path(other)}", "Choose another link name")


def identity(auth: object, found: Findings) -> Identity:
    """Which managed identity to use; all None keeps azure-identity's defaults."""
    if not isinstance(auth, dict) or not found.ok(AUTH):
        return Identity()
    endpoint = found.value(auth, (*AUTH, "msiEndpoint"), str)
    if endpoint is not None:
        try:
            for note in urls.identity_endpoint(endpoint):
                found.note((*AUTH, "msiEndpoint"), note)
        except urls.UrlProblem as err:
            found.problem((*AUTH, "msiEndpoint"), err.message,
                          err.hint or schema.hint_for("authenticationSettings", "msiEndpoint"))
            endpoint = None
    client = _client_id(auth, found)
    if client and endpoint is None and found.ok((*AUTH, "msiEndpoint")):
        found.note((*AUTH, "msiClientId"), "is given without msiEndpoint",
                   "The default IMDS endpoint is used with this client id")
    return Identity(msi_endpoint=endpoint, msi_client_id=client)


def _client_id(auth: dict[str, Any], found: Findings) -> str | None:
    path = (*AUTH, "msiClientId")
    client: str | None = found.value(auth, path, str)
    if client is None:
        return None
    if client == "":
        found.note(path, "is empty: no user-assigned identity is selected")
        return None
    if _GUID.fullmatch(client):
        return client
    if client.startswith("/subscriptions/") or "userassignedidentities" in client.lower():
        found.problem(path, "is a resource id, not a client id",
                      "Use the identity's clientId (a GUID): "
                      "az identity show --ids <resource id> --query clientId -o tsv")
    else:
        found.problem(path, "is not a GUID",
                      schema.hint_for("authenticationSettings", "msiClientId"))
    return None


def logging_target(cfg: object, found: Findings) -> LoggingTarget | None:
    """Where fluentd listens, when loggingSettings are given."""
    if not isinstance(cfg, dict) or not found.ok(LOGGING):
        return None
    path = (*LOGGING, "endpoint")
    endpoint = found.value(cfg, path, str)
    if endpoint is None:
        return None
    try:
        host, port, unix_path = urls.fluentd_endpoint(endpoint)
    except urls.UrlProblem as err:
        found.problem(path, err.message, schema.hint_for("loggingSettings", "endpoint"))
        return None
    name = found.value(cfg, (*LOGGING, "servicename"), str) or DEFAULT_SERVICENAME
    return LoggingTarget(servicename=name, host=host, port=port, unix_path=unix_path)
