"""The real WALinuxAgent code for the waagent stand-in: import it, and point its global state
(conf, logger, events, cgroups, clocks, environment) at one runner for the length of a pass.

Agent: WALinuxAgent 2.7.3.0, the Debian 12 package `waagent`, unpacked by `make waagent` into
tests/.cache/waagent/root (it needs the `distro` module, as the package does).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

AGENT_PY = Path(__file__).resolve().parents[1] / ".cache/waagent/root/usr/lib/python3/dist-packages"
AGENT_CONF = AGENT_PY.parents[3] / "etc/waagent.conf"
AGENT_VERSION = "2.7.3.0"
_MODULES = {"conf": "common.conf", "logger": "common.logger", "event": "common.event",
            "exthandlers": "ga.exthandlers", "wire": "common.protocol.wire",
            "processutil": "common.utils.extensionprocessutil",
            "cgroups": "common.cgroupconfigurator", "exception": "common.exception",
            "version": "common.version",
            "gs": "common.protocol.extensions_goal_state_from_extensions_config"}


def load_agent() -> SimpleNamespace:
    """Import the real agent's modules (the unpacked Debian package) or say how to get them."""
    if not (AGENT_PY / "azurelinuxagent").is_dir():
        raise RuntimeError(f"WALinuxAgent not unpacked at {AGENT_PY}: run `make waagent`")
    for module, hint in (("distro", "pip install distro"),
                         ("distutils.version", "Python >= 3.12: pip install setuptools")):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise RuntimeError(f"WALinuxAgent {AGENT_VERSION} imports {module}: {hint}") from error
    if str(AGENT_PY) not in sys.path:
        sys.path.append(str(AGENT_PY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # distutils, crypt: agent's imports
        return SimpleNamespace(**{key: importlib.import_module(f"azurelinuxagent.{module}")
                                  for key, module in _MODULES.items()})


class _ScaledClock:
    """The `time` module as seen by the agent's exthandlers: sleeps shortened by `scale`."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds * self.scale)


class _CommandClock:
    """The `time` module as seen by the agent's command polling: a tick ends when the command
    has exited (the agent then reads its exit code), so timeouts keep counting real seconds."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                return
            time.sleep(0.01)


def configure_agent(agent: SimpleNamespace, lib_dir: Path, log_dir: Path,
                    agent_log: Path) -> None:
    """Debian's /etc/waagent.conf with these dirs, no cgroups; the agent logs to `agent_log`."""
    conf, logger = agent.conf, agent.logger
    conf.__conf__.values.clear()
    if AGENT_CONF.is_file():
        conf.load_conf_from_file(str(AGENT_CONF))
    conf.__conf__.values.update({
        "Lib.Dir": str(lib_dir), "Extension.LogDir": str(log_dir),
        "CGroups.Enabled": "n", "Extensions.Enabled": "y", "Logs.Console": "n",
        "Logs.Verbose": "n", "OS.OpensslPath": shutil.which("openssl") or "openssl"})
    logger.DEFAULT_LOGGER.appenders = []
    logger.reset_periodic()
    logger.add_logger_appender(logger.AppenderType.FILE, logger.LogLevel.INFO, str(agent_log))
    agent.event.init_event_logger(str(lib_dir / "events"))
    agent.cgroups.CGroupConfigurator._instance = None  # uninitialised: cgroups off


@contextlib.contextmanager
def patched_clocks(agent: SimpleNamespace, poll_scale: float,
                   goal_state_timeout: float) -> Iterator[None]:
    """The agent's sleeps scaled, command polling ended at exit, the goal-state timeout set."""
    command_clock = _CommandClock()
    real_completion = agent.cgroups.handle_process_completion

    def completion(process: subprocess.Popen[bytes], **kwargs: Any) -> Any:
        command_clock.process = process
        return real_completion(process=process, **kwargs)

    patches = [(agent.exthandlers, "time", _ScaledClock(poll_scale)),
               (agent.exthandlers, "_DEFAULT_EXT_TIMEOUT_MINUTES", goal_state_timeout / 60),
               (agent.processutil, "time", command_clock),
               (agent.cgroups, "handle_process_completion", completion)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in originals:
            setattr(module, name, value)


@contextlib.contextmanager
def merged_environ(env: Mapping[str, str]) -> Iterator[None]:
    """`env` merged into os.environ (the agent hands os.environ to commands), then restored."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
