"""Where the extension lives on the VM: HandlerEnvironment.json, the extension, lib and state dirs,
the handler version and the sequence number of the settings to act on; the machine it runs on;
small state-file I/O. Stdlib only (with akvvm_ext.errors): `python3 -m handler` relies on it to
report a missing dependency.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from akvvm_ext import __version__
from akvvm_ext.errors import AkvvmError
from akvvm_ext.fsio import write_all

EXTENSION_NAME = "Microsoft.Azure.KeyVault.KeyVaultForLinux"
STATE_DIR_NAME = f"{EXTENSION_NAME}.State"
DEFAULT_LOG_DIR = f"/var/log/azure/{EXTENSION_NAME}"
HANDLER_ENVIRONMENT = "HandlerEnvironment.json"
PATH_VARIABLE = "AZURE_GUEST_AGENT_EXTENSION_PATH"
VERSION_VARIABLE = "AZURE_GUEST_AGENT_EXTENSION_VERSION"
SEQ_VARIABLE = "ConfigSequenceNumber"
SUPPORTED_MACHINES = ("x86_64", "aarch64")  # the machines the zip vendors wheels for
EXIT_UNSUPPORTED_OS = 51
EXIT_MISSING_DEPENDENCY = 52
_SETTINGS_FILE = re.compile(r"^(\d+)\.settings$")
_VERSION = re.compile(r"^\d+(\.\d+)*$")


class HandlerEnvironmentError(AkvvmError):
    """HandlerEnvironment.json is missing pieces or is not the agent's format."""

    code = "ENVIRONMENT"


@dataclass(frozen=True)
class Environment:
    """The folders the agent gave this handler, plus the ones derived from them."""

    extension_dir: str
    version: str
    log_dir: str
    config_dir: str
    status_dir: str
    heartbeat_file: str | None = None
    events_dir: str | None = None

    @property
    def lib_dir(self) -> str:
        """The agent's lib dir (normally /var/lib/waagent): always the extension dir's parent."""
        return os.path.dirname(os.path.abspath(self.extension_dir))

    @property
    def state_dir(self) -> str:
        """Version-less, so it survives upgrades (the agent deletes old versioned dirs)."""
        return os.path.join(self.lib_dir, STATE_DIR_NAME)


def package_dir() -> str:
    """The unpacked extension this code runs from (the parent of `handler/`)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extension_dir(environ: Mapping[str, str]) -> str:
    """The agent tells every command where the extension is; otherwise it is where this code is."""
    return os.path.abspath(environ.get(PATH_VARIABLE) or package_dir())


def version_of(ext_dir: str, environ: Mapping[str, str]) -> str:
    """The handler version: the agent's variable, else the `-<version>` suffix of the dir name."""
    given = environ.get(VERSION_VARIABLE, "")
    if _VERSION.match(given):
        return given
    suffix = os.path.basename(ext_dir).rpartition("-")[2]
    return suffix if _VERSION.match(suffix) else __version__


def load(environ: Mapping[str, str]) -> Environment:
    """Read `HandlerEnvironment.json` beside the manifest; missing: the agent's default layout."""
    ext_dir = extension_dir(environ)
    path = os.path.join(ext_dir, HANDLER_ENVIRONMENT)
    try:
        with open(path, encoding="utf-8-sig") as handle:
            folders = _folders(json.load(handle))
    except FileNotFoundError:
        folders = {}
    except (OSError, ValueError) as err:
        raise HandlerEnvironmentError(f"cannot read {path}: {err}") from err
    return Environment(
        extension_dir=ext_dir,
        version=version_of(ext_dir, environ),
        log_dir=_folder(folders, "logFolder") or DEFAULT_LOG_DIR,
        config_dir=_folder(folders, "configFolder") or os.path.join(ext_dir, "config"),
        status_dir=_folder(folders, "statusFolder") or os.path.join(ext_dir, "status"),
        heartbeat_file=_folder(folders, "heartbeatFile"),
        events_dir=_folder(folders, "eventsFolder"),
    )


def _folders(data: object) -> dict[str, object]:
    """The `handlerEnvironment` object of the first (only) element of the array."""
    if isinstance(data, list) and data and isinstance(data[0], dict):
        inner = data[0].get("handlerEnvironment")
        if isinstance(inner, dict):
            return inner
    raise ValueError("expected [{\"handlerEnvironment\": {...}}]")


def _folder(folders: Mapping[str, object], key: str) -> str | None:
    value = folders.get(key)
    return value if isinstance(value, str) and value else None


def sequence_number(config_dir: str, environ: Mapping[str, str]) -> int:
    """`$ConfigSequenceNumber`, else the newest `<n>.settings` (ties: the highest n), else 0.

    The file for the number need not exist: during an upgrade the old version's disable and
    uninstall are given the new version's number.
    """
    given = environ.get(SEQ_VARIABLE, "").strip()
    if given.isdigit():
        return int(given)
    newest: tuple[float, int] | None = None
    for name in _listdir(config_dir):
        match = _SETTINGS_FILE.match(name)
        path = os.path.join(config_dir, name)
        if match is None or not os.path.isfile(path):
            continue
        candidate = (os.path.getmtime(path), int(match.group(1)))
        newest = candidate if newest is None or candidate > newest else newest
    return newest[1] if newest else 0


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def ensure_state_dir(env: Environment) -> str:
    """Create the state dir (0700) if missing and return it; the mode is enforced every time."""
    os.makedirs(env.state_dir, mode=0o700, exist_ok=True)
    os.chmod(env.state_dir, 0o700)
    return env.state_dir


def read_text(path: str) -> str:
    """A small file's text, or "" when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return ""


def remove_file(path: str) -> None:
    """Delete a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Temp file born with its final mode in the same dir, fsync, rename. A write that cannot
    complete (disk full part-way) raises and removes the temp: the old file stays whole."""
    tmp = f"{path}.tmp.{os.getpid()}"
    remove_file(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove_file(tmp)
        raise


def version_key(version: str) -> tuple[int, ...]:
    """Numeric ordering of dotted versions ("3.10.0" > "3.9.1")."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def newer_versions(env: Environment) -> list[str]:
    """Extension dirs beside ours with a higher version: present during an upgrade."""
    prefix = f"{EXTENSION_NAME}-"
    mine = version_key(env.version)
    found = []
    for name in _listdir(env.lib_dir):
        version = name[len(prefix):] if name.startswith(prefix) else ""
        path = os.path.join(env.lib_dir, name)
        if _VERSION.match(version) and version_key(version) > mine and os.path.isdir(path):
            found.append(path)
    return sorted(found)


@dataclass(frozen=True)
class Host:
    """The machine and interpreter, as far as the vendored wheels care."""

    system: str  # sys.platform
    machine: str  # uname -m
    libc: str  # "glibc 2.36"; "" when not glibc (musl, ...)
    python: str

    def __str__(self) -> str:
        return f"{self.machine}, {self.libc or 'no glibc'}, Python {self.python}"

    @property
    def unsupported(self) -> str | None:
        """Why the package cannot bring its dependencies for this machine, if it cannot."""
        if not self.system.startswith("linux"):
            return f"the operating system is {self.system!r}, not Linux"
        if self.machine not in SUPPORTED_MACHINES:
            return f"the machine is {self.machine}, not x86_64 or aarch64"
        if not self.libc.startswith("glibc"):
            return "the C library is not glibc"
        return None


def this_host() -> Host:
    """The running machine: `uname -m`, the C library, the python version."""
    libc, libc_version = platform.libc_ver()
    return Host(sys.platform, platform.machine(),
                f"{libc} {libc_version}" if libc == "glibc" else "",
                platform.python_version())


def import_failure(err: BaseException, host: Host) -> tuple[str, int]:
    """The sentence for a dependency that does not import, and the exit code: 51 where the
    package has no dependencies for the machine, else 52."""
    name = getattr(err, "name", None) or "a dependency"
    detail = str(err)[:300]
    problem = host.unsupported
    if problem:
        return (f"Unsupported machine: {problem} ({host}); the python module {name} cannot be "
                f"imported ({detail}). KeyVaultForLinux supports Linux on x86_64 and aarch64 "
                "with glibc.", EXIT_UNSUPPORTED_OS)
    return (f"Missing dependency: the python module {name} cannot be imported ({detail}) on "
            f"this machine ({host}). The package brings its dependencies for CPython "
            "3.10-3.13 on x86_64 and aarch64 with glibc: use one of those pythons "
            "(AKVVM_PYTHON), reinstall the extension, or install the module.",
            EXIT_MISSING_DEPENDENCY)
