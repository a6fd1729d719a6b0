"""Settings: merge public and protected settings, parse them into frozen values, show the plan.

No I/O. `parse` reports every problem at once as `SettingsError`, each `<json path>: <problem>.
<hint>`; values are never echoed (only URLs, paths and link names, which are not secret).
"""
from __future__ import annotations

import difflib
import json
import posixpath
import re
from dataclasses import replace
from typing import Any

from akvvm_ext import schema
from akvvm_ext.errors import SettingsError
from akvvm_ext.model import (
    DEFAULT_POLLING_INTERVAL_S,
    DEFAULT_STORE,
    Identity,
    LoggingTarget,
    ObservedCertificate,
    Settings,
)
from akvvm_ext.schema import Path
from akvvm_ext.settings_rules import Findings, certificates, identity, logging_target, store_dir

SMS: Path = ("secretsManagementSettings",)
LOW_POLLING_S = 300
_RESOURCE_KEYS = {"autoUpgradeMinorVersion", "enableAutomaticUpgrade", "typeHandlerVersion"}


def merge(public: object, protected: object) -> dict[str, Any]:
    """Public settings deep-merged with protected settings, protected winning."""
    for side in (public, protected):
        if isinstance(side, str):
            parse(side)  # always raises, naming the escaped JSON and any further problem
        if side is not None and not isinstance(side, dict):
            found = Findings()
            found.problem((), f"must be an object, not {schema.described(side)}")
            raise SettingsError(found.problems)
    return _deep_merge(public or {}, protected or {})  # type: ignore[arg-type]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse(raw: object) -> Settings:
    """The effective settings of raw (merged) settings; `SettingsError` lists every problem."""
    found = Findings()
    raw = _unwrap(raw, found)
    for path, text in schema.problems(raw):
        found.bad.add(path)
        found.located.append((path, text))
    settings = Settings(observed=())
    if isinstance(raw, dict):
        _note_unknown(raw, found)
        settings = _build(raw, found)
    if found.located:
        raise SettingsError(found.problems)
    return replace(settings, notes=tuple(found.notes))


def _unwrap(raw: object, found: Findings) -> object:
    """Detect settings that arrived as a JSON string (PowerShell quoting) and look inside."""
    if not isinstance(raw, str):
        return raw
    for text in (raw, raw.replace('\\"', '"')):
        try:
            inner = json.loads(text)
        except ValueError:
            continue
        if isinstance(inner, dict):
            found.problem((), "arrived as a string holding JSON, not as a JSON object",
                          schema.ESCAPED_JSON_HINT)
            return inner
    found.problem((), "must be a JSON object, not a string", schema.ESCAPED_JSON_HINT)
    return None


def _note_unknown(raw: dict[str, Any], found: Findings) -> None:
    """One note per unknown key, however many certificates repeat it."""
    groups: dict[tuple[str, ...], list[tuple[Path, tuple[str, ...]]]] = {}
    for path, known in schema.unknown_keys(raw):
        shape = tuple("[]" if isinstance(part, int) else part for part in path)
        groups.setdefault(shape, []).append((path, known))
    for (path, known), *more in groups.values():
        key = str(path[-1])
        close = [k for k in known if k.lower() == key.lower()] or difflib.get_close_matches(
            key, known, n=1, cutoff=0.8)
        if key in _RESOURCE_KEYS:
            hint = "It is a property of the extension resource, not of its settings"
        elif close:
            hint = f"Did you mean {close[0]}? Names are case-sensitive"
        else:
            hint = "Check its spelling and place against docs/settings.md"
        also = f" (also in {len(more)} more place(s))" if more else ""
        found.note(path, f"unknown setting, ignored{also}", hint)


def _build(raw: dict[str, Any], found: Findings) -> Settings:
    sms = raw.get("secretsManagementSettings") if found.ok(SMS) else None
    sms = sms if isinstance(sms, dict) else {}
    acl_enabled = _flag(sms, "aclEnabled", True, found)
    for ignored in ("linkOnRenewal", "certificateStoreName"):
        if ignored in sms:
            found.note((*SMS, ignored), "is ignored on Linux")
    store = _store(sms, found)
    observed = certificates(sms, store, acl_enabled, found)
    return Settings(
        observed=observed,
        polling_interval_s=_polling(sms, found),
        require_initial_sync=_flag(sms, "requireInitialSync", False, found),
        acl_enabled=acl_enabled,
        identity=identity(raw.get("authenticationSettings"), found),
        logging=logging_target(raw.get("loggingSettings"), found),
    )


def _flag(sms: dict[str, Any], key: str, default: bool, found: Findings) -> bool:
    value = sms.get(key, default)
    return value if isinstance(value, bool) and found.ok((*SMS, key)) else default


def _store(sms: dict[str, Any], found: Findings) -> str:
    path = (*SMS, "certificateStoreLocation")
    value = sms.get("certificateStoreLocation")
    if not isinstance(value, str) or not found.ok(path):
        return DEFAULT_STORE
    return store_dir(value, path, found) or DEFAULT_STORE


def _polling(sms: dict[str, Any], found: Findings) -> int:
    path = (*SMS, "pollingIntervalInS")
    value = sms.get("pollingIntervalInS")
    if value is None or not found.ok(path):
        return DEFAULT_POLLING_INTERVAL_S
    if not isinstance(value, str):
        found.note(path, "is a JSON number; the documented form is a string such as \"3600\"",
                   "Accepted as is")
    digits = (value.lstrip("0") or "0") if isinstance(value, str) else ""  # digits only (schema)
    if isinstance(value, (int, float)):  # jsonschema counts 3600.0 as an integer
        seconds = int(value)
    else:
        seconds = int(digits) if len(digits) <= 12 else 0
    if not 1 <= seconds <= 31536000:
        found.problem(path, "must be between 1 and 31536000 seconds", "Use e.g. \"3600\"")
        return DEFAULT_POLLING_INTERVAL_S
    if seconds < LOW_POLLING_S:
        found.note(path, f"polls every {seconds} s; below {LOW_POLLING_S} s many VMs polling one "
                   "vault risk Key Vault throttling", "Consider \"3600\" (the default)")
    return seconds


def plan(settings: Settings) -> dict[str, Any]:
    """The effective plan as JSON-able data: what `check` prints. Shows no secret."""
    return {
        "certificates": [_certificate_plan(cert) for cert in settings.observed],
        "pollingIntervalInS": settings.polling_interval_s,
        "requireInitialSync": settings.require_initial_sync,
        "aclEnabled": settings.acl_enabled,
        "identity": _identity_plan(settings.identity),
        "logging": _logging_plan(settings.logging),
        "notes": list(settings.notes),
    }


def _certificate_plan(cert: ObservedCertificate) -> dict[str, Any]:
    return {
        "url": cert.url,
        "vault": cert.vault_name,
        "vaultUrl": cert.vault_url,
        "secretName": cert.secret_name,
        "version": cert.version or "latest",
        "storeDir": cert.store_dir,
        "link": posixpath.join(cert.store_dir, cert.link_name),
        "versionFiles": posixpath.join(cert.store_dir, f"{cert.file_prefix}.<version>"),
        "acls": [{"user": g.user, "group": g.group} for g in cert.acls],
        "relaxedChallenge": cert.relaxed_challenge,
    }


def _identity_plan(ident: Identity) -> dict[str, Any]:
    return {
        "kind": "user-assigned" if ident.msi_client_id else "system-assigned",
        "msiEndpoint": (re.split("[?#]", ident.msi_endpoint)[0] if ident.msi_endpoint
                        else "default (azure-identity: IMDS or its environment)"),
        "msiClientId": ident.msi_client_id,
    }


def _logging_plan(target: LoggingTarget | None) -> dict[str, Any] | None:
    if target is None:
        return None
    endpoint = f"unix://{target.unix_path}" if target.unix_path else f"tcp://{target.host}:{target.port}"
    return {"logger": "fluentd", "format": "forward", "endpoint": endpoint,
            "servicename": target.servicename}
