"""The five lifecycle commands the agent runs, as a table of small operations on a `Context`.

Each returns a one-line summary for the log or raises; `handler.main` alone turns errors into
error statuses and exit codes. Only enable needs third-party packages (imported there): the
dependency guard in `handler.__main__` runs update and uninstall with the standard library alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from akvvm_ext import acl
from akvvm_ext.errors import AkvvmError
from handler import environment, grants
from handler.environment import EXTENSION_NAME, Environment, remove_file, write_atomic
from handler.supervisor import ServiceSpec, Supervisor, spec_for

KEPT_STATUS = "last-good-status"  # where a service kept running after refused settings reports
log = logging.getLogger(__name__)

MIN_PYTHON = (3, 10)
REQUIRED_MODULES = ("cryptography", "jsonschema", "azure.identity", "azure.keyvault.secrets",
                    "tenacity", "fluent")
STARTING = "Starting Key Vault extension service"
LOCK_TIMEOUT_S = 120.0
UPDATE_MARKER = "updating.json"
UPDATING_FROM = "AZURE_GUEST_AGENT_UPDATING_FROM_VERSION"
Action = Literal["unchanged", "reload", "restart"]


class LifecycleError(AkvvmError):
    """A lifecycle command failed; `exit_code` is what the agent sees."""

    code = "LIFECYCLE"
    exit_code = 1


class UnsupportedOS(LifecycleError):
    code = "UNSUPPORTED_OS"
    exit_code = environment.EXIT_UNSUPPORTED_OS


class MissingDependency(LifecycleError):
    code = "MISSING_DEPENDENCY"
    exit_code = environment.EXIT_MISSING_DEPENDENCY


@dataclass(frozen=True)
class Context:
    """Everything one command needs, built once by `handler.main`."""

    env: Environment
    seq: int
    environ: Mapping[str, str]
    supervisor: Supervisor
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)

    @property
    def spec(self) -> ServiceSpec:
        return spec_for(self.env.extension_dir, self.env.state_dir, self.env.log_dir,
                        self.environ)


# --- install -------------------------------------------------------------------------------


def install(ctx: Context) -> str:
    """Check prerequisites (Linux, python3 >= 3.10, openssl, the vendored modules)."""
    host = environment.this_host()
    if not host.system.startswith("linux"):
        raise UnsupportedOS(f"unsupported operating system {host.system!r}",
                            "KeyVaultForLinux runs on Linux only.")
    if sys.version_info < MIN_PYTHON:
        raise MissingDependency(f"python {host.python} is too old",
                                "Install python3 3.10 or newer.")
    if shutil.which("openssl") is None:
        raise MissingDependency("openssl not found on PATH",
                                "Install the openssl package (apt-get/tdnf install openssl).")
    missing = [name for name in REQUIRED_MODULES if not _importable(name)]
    if missing:
        found = f"python modules missing: {', '.join(missing)} ({host})"
        if host.unsupported:
            raise UnsupportedOS(f"{found}: {host.unsupported}",
                                "KeyVaultForLinux supports x86_64 and aarch64 with glibc.")
        raise MissingDependency(found, "The extension package is incomplete for this python; "
                                "reinstall the extension or install the modules.")
    if not _importable("posix1e") and shutil.which("setfacl") is None:
        log.warning("Neither pylibacl nor setfacl found: certificates with `acls` will report an "
                    "error until the acl package is installed")
    environment.ensure_state_dir(ctx.env)
    return f"install: prerequisites present ({host})"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# --- enable --------------------------------------------------------------------------------


def enable(ctx: Context) -> str:
    """Validate the settings, then make the service run them; cheap when nothing changed."""
    from akvvm_ext.settings import parse  # jsonschema and cryptography: enable's alone
    from handler import settings_file

    reported = os.path.exists(os.path.join(ctx.env.status_dir, f"{ctx.seq}.status"))
    if not reported:
        report_starting(ctx)
    try:  # SettingsError: the running service keeps its last good config
        raw = settings_file.read(ctx.env.config_dir, ctx.seq, ctx.env.lib_dir)
        settings = parse(raw)
    except AkvvmError:
        _keep_last_good_running(ctx)  # ... and a stopped one (an upgrade's disable) runs it again
        raise
    for note in settings.notes:
        log.info("Settings: %s", note)
    environment.ensure_state_dir(ctx.env)
    with lifecycle_lock(ctx.env.state_dir):
        remove_file(os.path.join(ctx.env.state_dir, UPDATE_MARKER))
        action = _apply(ctx, config_document(ctx, raw), reported)
    return (f"enable seq {ctx.seq}: {len(settings.observed)} observed certificate(s), "
            f"{ctx.supervisor.kind} service {action}")


def _keep_last_good_running(ctx: Context) -> None:
    """Refused settings must not leave the VM without its service: when the last good config
    is not running (an upgrade's disable stopped it), start it again from this version. It
    reports into the state dir, so that the agent sees this enable's error."""
    spec, old = ctx.spec, _load_json(ctx.spec.config_path)
    if old is None or ctx.supervisor.is_running(spec):
        return
    kept = {**old, "extensionPath": ctx.env.extension_dir, "handlerVersion": ctx.env.version,
            "logFolder": ctx.env.log_dir,
            "statusFolder": os.path.join(ctx.env.state_dir, KEPT_STATUS)}
    try:
        with lifecycle_lock(ctx.env.state_dir):
            os.makedirs(kept["statusFolder"], mode=0o700, exist_ok=True)
            ctx.supervisor.install(spec)
            write_atomic(spec.config_path, json.dumps(kept, indent=1, sort_keys=True).encode(),
                         0o600)
            ctx.supervisor.restart(spec)
        log.warning("Settings refused; the service runs the last good settings (seq %s) again",
                    old.get("seq"))
    except (AkvvmError, OSError) as err:
        log.warning("Settings refused, and the last good settings could not run again: %s", err)


def report_starting(ctx: Context) -> None:
    """A transitioning status: the agent never finds the file missing while the service starts."""
    from handler import status  # tenacity, through the engine's service module

    os.makedirs(ctx.env.status_dir, exist_ok=True)
    status.write(ctx.env.status_dir, ctx.seq,
                 status.document("Enable", "transitioning", STARTING, now=ctx.clock()))


def config_document(ctx: Context, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The service's effective config (DESIGN: config.json)."""
    return {"settings": dict(raw), "seq": ctx.seq, "statusFolder": ctx.env.status_dir,
            "logFolder": ctx.env.log_dir, "extensionPath": ctx.env.extension_dir,
            "handlerVersion": ctx.env.version}


def decide(old: Mapping[str, Any] | None, new: Mapping[str, Any], redefined: bool,
           running: bool, reported: bool = True) -> Action:
    """Restart when what the service does changed; reload when only where it reports changed.
    An unchanged config whose status file was missing also restarts: the running service
    rewrites its status only when the content changes."""
    if old is None or redefined or not running or _material(old) != _material(new):
        return "restart"
    if dict(old) != dict(new):
        return "reload"
    return "unchanged" if reported else "restart"


def _material(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in ("seq", "statusFolder")}


def _apply(ctx: Context, new: dict[str, Any], reported: bool) -> Action:
    spec = ctx.spec
    old = _load_json(spec.config_path)
    redefined = ctx.supervisor.install(spec)
    action = decide(old, new, redefined, ctx.supervisor.is_running(spec), reported)
    if action == "unchanged":
        return action
    report_starting(ctx)
    data = json.dumps(new, indent=1, sort_keys=True).encode()
    write_atomic(spec.config_path, data, 0o600)
    if action == "reload":
        ctx.supervisor.reload(spec)
    else:
        ctx.supervisor.restart(spec)
    log.info("Service %s (seq %d, extension %s)", action, ctx.seq, ctx.env.extension_dir)
    return action


# --- disable, update, uninstall ------------------------------------------------------------


def disable(ctx: Context) -> str:
    """Stop the service; best effort (a failing disable would block the extension's removal)."""
    if not os.path.isdir(ctx.env.state_dir):
        ctx.supervisor.stop(ctx.spec)
        return "disable: no state, nothing to stop"
    with lifecycle_lock(ctx.env.state_dir):
        ctx.supervisor.stop(ctx.spec)
    return "disable: service stopped"


def update(ctx: Context) -> str:
    """Runs in the new version before the old one's uninstall: leave it a note that we take over."""
    previous = ctx.environ.get(UPDATING_FROM, "unknown")
    target = ctx.environ.get("VERSION") or ctx.env.version
    environment.ensure_state_dir(ctx.env)
    marker = json.dumps({"from": previous, "to": target}).encode()
    write_atomic(os.path.join(ctx.env.state_dir, UPDATE_MARKER), marker, 0o600)
    return (f"update from {previous} to {target}: the state dir is version-less, "
            "nothing to migrate")


def uninstall(ctx: Context) -> str:
    """Remove the service and state, unless another version is taking over (upgrade/downgrade)."""
    successor = _successor(ctx.env)
    if successor:
        return f"uninstall {ctx.env.version}: {successor} takes over, service and state kept"
    left = ""
    if os.path.isdir(ctx.env.state_dir):
        with lifecycle_lock(ctx.env.state_dir):
            ctx.supervisor.remove(ctx.spec)
            left = revert_ancestor_grants(ctx.env.state_dir)
        shutil.rmtree(ctx.env.state_dir, ignore_errors=True)
    else:
        ctx.supervisor.remove(ctx.spec)
    return f"uninstall: service removed{left}; installed certificates are kept"


def revert_ancestor_grants(state_dir: str) -> str:
    """Take back the traversal ACLs the service added to store ancestors (the grants ledger);
    the grants on the certificates themselves stay with them. Returns what it had to leave."""
    recorded = grants.load(state_dir)
    if recorded and acl.use_tools and not all(map(shutil.which, ("getfacl", "setfacl"))):
        paths = ", ".join(sorted({g.path for g in recorded})[:5])
        log.warning("Neither pylibacl nor getfacl/setfacl: ancestor ACL grants left on %s", paths)
        return (f", {len(recorded)} traversal ACL grant(s) left on {paths} (neither pylibacl "
                "nor getfacl/setfacl found; remove them with setfacl -x)")
    try:
        acl.revert(recorded)
    except AkvvmError as err:
        log.warning("could not revert ancestor ACL grants: %s", err)
    return ""


def _successor(env: Environment) -> str | None:
    """A newer version dir beside ours, or the version an update just announced."""
    newer = environment.newer_versions(env)
    if newer:
        return os.path.basename(newer[-1])
    marker = _load_json(os.path.join(env.state_dir, UPDATE_MARKER)) or {}
    target = marker.get("to")
    if isinstance(target, str) and target != env.version:
        path = os.path.join(env.lib_dir, f"{EXTENSION_NAME}-{target}")
        if os.path.isdir(path):
            return os.path.basename(path)
    return None


# --- shared pieces -------------------------------------------------------------------------


@contextlib.contextmanager
def lifecycle_lock(state_dir: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """One lifecycle command at a time (the service's own lock guards against a second service)."""
    path = os.path.join(state_dir, "lifecycle.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LifecycleError(f"another lifecycle command held {path} for "
                                         f"{timeout:.0f} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _load_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None



OPERATIONS: dict[str, Callable[[Context], str]] = {
    "install": install, "enable": enable, "disable": disable, "update": update,
    "uninstall": uninstall,
}
