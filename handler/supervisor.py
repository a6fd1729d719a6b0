"""Keeps at most one `akvvm_service` running: a systemd unit where systemd is PID 1, elsewhere a
detached daemon (new session, stdio to a log, pidfile and lock held by the service itself).
`choose` is the one place that decides which.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from akvvm_ext.errors import AkvvmError
from handler.environment import read_text, remove_file, write_atomic

log = logging.getLogger(__name__)

UNIT_NAME = "akvvm_service.service"
UNIT_DIR = "/etc/systemd/system"
UNIT_TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), UNIT_NAME)
SYSTEMD_MARKER = "/run/systemd/system"  # exists only when systemd is PID 1
CHOICE_VARIABLE = "AKVVM_SUPERVISOR"  # "daemon" or "systemd": overrides the detection (tests)
PASSTHROUGH = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy",
               "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR",
               # azure-identity's own variables (Azure Arc, a default client id, the IMDS host):
               # without an msiEndpoint its defaults and these decide, in the service as in enable
               "IDENTITY_ENDPOINT", "IMDS_ENDPOINT", "AZURE_CLIENT_ID",
               "AZURE_POD_IDENTITY_AUTHORITY_HOST")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONSOLE_LOG = "akvvm_service.console.log"


class SupervisorError(AkvvmError):
    """The service could not be started, stopped or installed."""

    code = "SUPERVISOR"


@dataclass(frozen=True)
class ServiceSpec:
    """What to run: the launcher of the current extension dir on the state dir's config."""

    extension_dir: str
    state_dir: str
    log_dir: str
    environment: tuple[tuple[str, str], ...] = ()

    @property
    def config_path(self) -> str:
        return os.path.join(self.state_dir, "config.json")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.state_dir, "akvvm_service.pid")

    @property
    def environment_file(self) -> str:
        return os.path.join(self.state_dir, "akvvm_service.env")

    @property
    def argv(self) -> list[str]:
        return [os.path.join(self.extension_dir, "bin", "akvvm"), "service",
                "--config", self.config_path]


def spec_for(extension_dir: str, state_dir: str, log_dir: str,
             environ: Mapping[str, str]) -> ServiceSpec:
    """The service spec, passing proxies, CA bundles, azure-identity's endpoint variables and
    every `AKVVM_*` variable through."""
    names = sorted(n for n in environ if n in PASSTHROUGH or n.startswith("AKVVM_"))
    return ServiceSpec(extension_dir, state_dir, log_dir,
                       tuple((n, environ[n]) for n in names if n != CHOICE_VARIABLE))


class Supervisor(Protocol):
    """Start, stop and look at the one service instance."""

    kind: str

    def install(self, spec: ServiceSpec) -> bool:
        """Write the service definition; True when it changed (a restart is due)."""

    def restart(self, spec: ServiceSpec) -> None:
        """Start the service, stopping a running instance first."""

    def reload(self, spec: ServiceSpec) -> None:
        """Ask the running service to re-read its config (SIGHUP)."""

    def stop(self, spec: ServiceSpec) -> None:
        """Stop the service if it runs; keeps its definition."""

    def is_running(self, spec: ServiceSpec) -> bool:
        """Is an instance of our service alive?"""

    def remove(self, spec: ServiceSpec) -> None:
        """Stop the service and delete its definition."""


Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a short system command, capturing its output."""
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, check=False)


def choose(environ: Mapping[str, str], marker: str = SYSTEMD_MARKER, unit_dir: str = UNIT_DIR,
           runner: Runner = run) -> Supervisor:
    """systemd where it is PID 1 (or when `AKVVM_SUPERVISOR=systemd`), else the daemon."""
    forced = environ.get(CHOICE_VARIABLE, "")
    if forced == "systemd" or (forced != "daemon" and os.path.isdir(marker)):
        return Systemd(unit_dir, runner)
    return Daemon()


def _word(arg: str) -> str:
    """One word of a systemd command line: quoted; `\\`, `"`, `%` and `$` escaped."""
    return '"' + _escaped(arg).replace("%", "%%").replace("$", "$$") + '"'


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def unit_text(spec: ServiceSpec) -> str:
    """The unit file for `spec` (template beside this module); ExecStart follows upgrades."""
    with open(UNIT_TEMPLATE, encoding="utf-8") as handle:
        template = handle.read()
    return template.format(exec_start=" ".join(_word(a) for a in spec.argv),
                           environment_file=spec.environment_file.replace("%", "%%"))


def environment_text(spec: ServiceSpec) -> str:
    """The unit's EnvironmentFile: the unit is world-readable, a proxy URL may hold a password."""
    return "".join(f'{k}="{_escaped(v)}"\n' for k, v in spec.environment)


class Systemd:
    """The unit `akvvm_service.service`, driven through `systemctl`."""

    kind = "systemd"

    def __init__(self, unit_dir: str = UNIT_DIR, runner: Runner = run) -> None:
        self.unit_path = os.path.join(unit_dir, UNIT_NAME)
        self._run = runner

    def _systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = self._run(["systemctl", *args])
        if check and done.returncode != 0:
            raise SupervisorError(f"systemctl {' '.join(args)} failed: "
                                  f"{(done.stderr or done.stdout).strip()}")
        return done

    def install(self, spec: ServiceSpec) -> bool:
        text, env = unit_text(spec), environment_text(spec)
        if read_text(self.unit_path) == text and read_text(spec.environment_file) == env:
            return False
        write_atomic(spec.environment_file, env.encode(), 0o600)
        write_atomic(self.unit_path, text.encode(), 0o644)
        self._systemctl("daemon-reload")
        log.info("Service unit %s written", self.unit_path)
        return True

    def restart(self, spec: ServiceSpec) -> None:
        self._systemctl("enable", UNIT_NAME)
        self._systemctl("restart", UNIT_NAME)

    def reload(self, spec: ServiceSpec) -> None:
        self._systemctl("reload", UNIT_NAME)

    def stop(self, spec: ServiceSpec) -> None:
        """Stop it and keep it from starting at boot while the extension is disabled."""
        self._systemctl("disable", "--now", UNIT_NAME, check=False)

    def is_running(self, spec: ServiceSpec) -> bool:
        return self._systemctl("is-active", "--quiet", UNIT_NAME, check=False).returncode == 0

    def remove(self, spec: ServiceSpec) -> None:
        self._systemctl("disable", "--now", UNIT_NAME, check=False)
        if os.path.lexists(self.unit_path):
            os.unlink(self.unit_path)
            self._systemctl("daemon-reload", check=False)


class Daemon:
    """A detached process in its own session; the service writes the pidfile and holds the lock."""

    kind = "daemon"

    def __init__(self, start_timeout: float = 15.0, stop_timeout: float = 10.0) -> None:
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout

    def install(self, spec: ServiceSpec) -> bool:
        """Record the definition beside the pidfile, so a changed path or proxy restarts it."""
        path = os.path.join(spec.state_dir, "akvvm_service.definition")
        text = json.dumps({"argv": spec.argv, "environment": spec.environment}, indent=1)
        if read_text(path) == text:
            return False
        write_atomic(path, text.encode(), 0o600)
        return True

    def restart(self, spec: ServiceSpec) -> None:
        self.stop(spec)
        _launch(spec)
        if self._wait(lambda: self.pid(spec) is not None, self.start_timeout):
            log.info("Service started as pid %s", self.pid(spec))
            return
        raise SupervisorError(
            f"the service did not start within {self.start_timeout:.0f} s",
            f"See {os.path.join(spec.log_dir, 'akvvm_service.log')} and {CONSOLE_LOG}.")

    def reload(self, spec: ServiceSpec) -> None:
        pid = self.pid(spec)
        if pid is None:
            raise SupervisorError("the service is not running, cannot reload it")
        os.kill(pid, signal.SIGHUP)

    def stop(self, spec: ServiceSpec) -> None:
        pid = self.pid(spec)
        if pid is None:
            remove_file(spec.pidfile)  # stale: its process is gone or is not ours
            return
        os.kill(pid, signal.SIGTERM)
        # until it is gone or no longer our service (a pid can be reused meanwhile)
        if not self._wait(lambda: not self._ours(pid, spec), self.stop_timeout):
            log.warning("Service pid %d ignored SIGTERM for %.0f s; killing it", pid,
                        self.stop_timeout)
            os.kill(pid, signal.SIGKILL)
            self._wait(lambda: not _alive(pid), 5.0)
        if read_text(spec.pidfile).strip() == str(pid):
            remove_file(spec.pidfile)
        log.info("Service pid %d stopped", pid)

    def is_running(self, spec: ServiceSpec) -> bool:
        return self.pid(spec) is not None

    def remove(self, spec: ServiceSpec) -> None:
        self.stop(spec)
        remove_file(os.path.join(spec.state_dir, "akvvm_service.definition"))

    def pid(self, spec: ServiceSpec) -> int | None:
        """The pid in the pidfile, if that process is alive and is our service."""
        text = read_text(spec.pidfile).strip()
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if self._ours(pid, spec) else None

    @staticmethod
    def _ours(pid: int, spec: ServiceSpec) -> bool:
        """Alive and still running our service's command line (a pid can be reused)."""
        return _alive(pid) and is_service_cmdline(cmdline(pid), spec)

    @staticmethod
    def _wait(done: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def _launch(spec: ServiceSpec) -> None:
    """Double fork through sh: the service ends up re-parented, in its own session."""
    os.makedirs(spec.log_dir, mode=0o755, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), **dict(spec.environment)}
    with open(os.path.join(spec.log_dir, CONSOLE_LOG), "ab") as console:
        done = subprocess.run(["/bin/sh", "-c", '"$@" </dev/null &', "akvvm",
                               *spec.argv], stdout=console, stderr=console, env=env, cwd="/",
                              start_new_session=True, check=False, timeout=30)
    if done.returncode != 0:
        raise SupervisorError(f"cannot launch {spec.argv[0]} (exit {done.returncode})")


def cmdline(pid: int) -> list[str]:
    """The argv of a process, or [] when it is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def is_service_cmdline(argv: Sequence[str], spec: ServiceSpec) -> bool:
    """Our service, whatever interpreter runs it: `service --config <our config>`."""
    return "service" in argv and spec.config_path in argv


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")

