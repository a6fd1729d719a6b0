"""Reads the settings waagent delivers (`config/<seq>.settings`) or a bare settings object file.

Decrypts protectedSettings with the agent's `<lib>/<THUMB>.crt/.prv` pair and merges them over
the public settings (`akvvm_ext.settings.merge`). Every failure is a `SettingsError` whose text
names the file or JSON path, never a settings value.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from akvvm_ext.errors import SettingsError
from akvvm_ext.schema import ESCAPED_JSON_HINT, sentence
from akvvm_ext.settings import merge
from handler import cms

HANDLER_SETTINGS = "runtimeSettings[0].handlerSettings"
PROTECTED = f"{HANDLER_SETTINGS}.protectedSettings"
THUMBPRINT = f"{HANDLER_SETTINGS}.protectedSettingsCertThumbprint"
_THUMBPRINT = re.compile(r"[0-9A-Fa-f]{40}|[0-9A-Fa-f]{64}")


@dataclass(frozen=True)
class Loaded:
    """Merged raw settings plus notes about how the file was read (e.g. a tolerated comma)."""

    raw: dict[str, Any]
    notes: tuple[str, ...] = ()


def read(config_dir: str, seq: int, lib_dir: str) -> dict[str, Any]:
    """The merged raw settings of `<config_dir>/<seq>.settings`."""
    return load(os.path.join(config_dir, f"{seq}.settings"), lib_dir).raw


def load(path: str, lib_dir: str | None = None) -> Loaded:
    """A waagent `N.settings` file or a bare settings object; `lib_dir` defaults to the
    parent of the extension dir that holds `config/` (`<lib>/<extension>/config/N.settings`)."""
    document, notes = _json(_text(path, path), path)
    if isinstance(document, dict) and "runtimeSettings" in document:
        handler = _handler_settings(document)
        lib = lib_dir or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(path))))
        return Loaded(merge(handler.get("publicSettings"), _protected(handler, lib)), notes)
    return Loaded(merge(document, None), notes)


def _fail(where: str, problem: str, hint: str = "") -> SettingsError:
    return SettingsError([sentence((where,), problem, hint)])


def _text(path: str, label: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise _fail(label, f"cannot be read ({err.strerror})") from err
    if not data.strip():
        raise _fail(label, "is empty: no settings were delivered",
                    "Give the extension its settings, e.g. az vm extension set ... "
                    "--settings @settings.json")
    try:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _fail(label, "is neither UTF-8 nor UTF-16 text", "Save it as UTF-8") from err


def _json(text: str, label: str) -> tuple[object, tuple[str, ...]]:
    try:
        return json.loads(text), ()
    except json.JSONDecodeError as err:
        error = err
    relaxed, commas = without_trailing_commas(text)
    try:
        document = json.loads(relaxed)
    except json.JSONDecodeError:
        where = f"line {error.lineno} column {error.colno}"
        if '\\"' in text:
            raise _fail(label, f"is not JSON ({where}): it holds \\\" escapes",
                        ESCAPED_JSON_HINT) from error
        raise _fail(label, f"is not valid JSON ({where}: {error.msg})") from error
    notes = tuple(sentence((label,), f"trailing comma at line {line} column {column} accepted",
                           "Remove it: az --settings and strict JSON readers refuse it")
                  for line, column in commas)
    return document, notes


def without_trailing_commas(text: str) -> tuple[str, list[tuple[int, int]]]:
    """`text` with each comma that directly precedes `]` or `}` blanked, and their (line, col)."""
    chars, found = list(text), []
    in_string = escaped = False
    pending: int | None = None
    for index, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string, pending = True, None
        elif char == ",":
            pending = index
        elif char in "]}" and pending is not None:
            chars[pending] = " "
            found.append((text.count("\n", 0, pending) + 1, pending - text.rfind("\n", 0, pending)))
            pending = None
        elif not char.isspace():
            pending = None
    return "".join(chars), found


def _handler_settings(document: dict[str, Any]) -> dict[str, Any]:
    runtime = document.get("runtimeSettings")
    if not isinstance(runtime, list) or not runtime or not isinstance(runtime[0], dict):
        raise _fail("runtimeSettings", "must be an array holding one object",
                    "This is not a settings file written by the guest agent")
    handler = runtime[0].get("handlerSettings")
    if handler is None:
        return {}
    if not isinstance(handler, dict):
        raise _fail(HANDLER_SETTINGS, "must be an object")
    return handler


def _protected(handler: dict[str, Any], lib_dir: str) -> object:
    blob = handler.get("protectedSettings")
    if blob is None or blob == "":
        return None
    if not isinstance(blob, str):
        raise _fail(PROTECTED, "must be a base64 string")
    try:
        der = base64.b64decode("".join(blob.split()), validate=True)
    except binascii.Error as err:
        raise _fail(PROTECTED, "is not base64", "Re-deploy the extension settings") from err
    try:
        plaintext = cms.decrypt(der, *_transport_pair(handler, lib_dir))
    except cms.CmsError as err:
        raise _fail(PROTECTED, f"cannot be decrypted: {err.message}", err.hint) from err
    try:
        return json.loads(plaintext.decode("utf-8-sig"))
    except ValueError as err:
        raise _fail(PROTECTED, "decrypts to something that is not JSON",
                    "Give the protected settings as a JSON object") from err


def _transport_pair(handler: dict[str, Any], lib_dir: str) -> tuple[str, str]:
    thumbprint = handler.get("protectedSettingsCertThumbprint")
    if not isinstance(thumbprint, str) or not _THUMBPRINT.fullmatch(thumbprint):
        raise _fail(THUMBPRINT, "is missing or not a certificate thumbprint (hex)")
    for name in (thumbprint, thumbprint.upper()):
        crt, prv = (os.path.join(lib_dir, f"{name}.{ext}") for ext in ("crt", "prv"))
        if os.path.exists(crt) and os.path.exists(prv):
            return crt, prv
    raise _fail(PROTECTED, f"cannot be decrypted: {thumbprint}.crt/.prv not found in {lib_dir}",
                "Check on the VM whose agent wrote the file, as root, or pass --lib-dir")
