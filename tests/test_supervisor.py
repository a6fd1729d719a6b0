"""handler.supervisor: the systemd unit (verified by systemd-analyze) and the live daemon path."""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from handler import supervisor
from handler.supervisor import Daemon, ServiceSpec, Systemd
from tests.waiting import wait_until

FAKE_SERVICE = """#!{python}
# Stand-in for bin/akvvm: behaves like the service towards the supervisor (pidfile, signals).
import os, signal, sys, time
config = sys.argv[sys.argv.index("--config") + 1]
state = os.path.dirname(config)
pidfile = os.path.join(state, "akvvm_service.pid")
def hup(*_):
    with open(os.path.join(state, "hups"), "a") as handle:
        handle.write("hup\\n")
def term(*_):
    os.unlink(pidfile)
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, term)
with open(os.path.join(state, "env"), "w") as handle:
    handle.write(os.environ.get("HTTPS_PROXY", ""))
with open(pidfile + ".tmp", "w") as handle:
    handle.write(str(os.getpid()))
os.replace(pidfile + ".tmp", pidfile)
while True:
    time.sleep(0.05)
"""


@pytest.fixture
def spec(tmp_path):
    """An extension dir whose bin/akvvm is the fake service, plus state and log dirs."""
    ext = tmp_path / "ext"
    (ext / "bin").mkdir(parents=True)
    launcher = ext / "bin" / "akvvm"
    launcher.write_text(FAKE_SERVICE.format(python=sys.executable))
    launcher.chmod(0o755)
    (tmp_path / "state").mkdir()
    made = ServiceSpec(str(ext), str(tmp_path / "state"), str(tmp_path / "log"),
                       (("HTTPS_PROXY", "http://127.0.0.1:3128"),))
    yield made
    for pid in service_pids(made):
        os.kill(pid, signal.SIGKILL)


def service_pids(spec: ServiceSpec) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and supervisor.is_service_cmdline(supervisor.cmdline(int(p)), spec)]


def hups(spec: ServiceSpec) -> int:
    path = os.path.join(spec.state_dir, "hups")
    return open(path).read().count("hup") if os.path.exists(path) else 0


class Recorder:
    """Stands in for `systemctl` (which needs a running systemd); records each call."""

    def __init__(self, active: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.active = active

    def __call__(self, argv):
        self.calls.append(list(argv))
        code = 0 if self.active or argv[1] != "is-active" else 3
        return subprocess.CompletedProcess(list(argv), code, "", "")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_passes_systemd_analyze_verify(spec, tmp_path):
    """The generated unit is valid for systemd, including quoted paths."""
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    Systemd(str(unit_dir), Recorder()).install(spec)
    unit = unit_dir / supervisor.UNIT_NAME
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    text = unit.read_text()
    assert f'ExecStart="{spec.extension_dir}/bin/akvvm" "service"' in text
    assert f"EnvironmentFile=-{spec.state_dir}/akvvm_service.env" in text
    assert "Restart=on-failure" in text and "KillSignal=SIGTERM" in text


def test_proxy_settings_go_to_a_private_environment_file(spec, tmp_path):
    """The world-readable unit never holds a proxy URL; the 0600 EnvironmentFile does."""
    odd = ServiceSpec(spec.extension_dir, spec.state_dir, spec.log_dir,
                      (("HTTPS_PROXY", "http://u:p%40ss@127.0.0.1:3128"), ("NO_PROXY", 'a "b"')))
    Systemd(str(tmp_path), Recorder()).install(odd)
    assert "p%40ss" not in unit_file(tmp_path)
    env_file = os.path.join(spec.state_dir, "akvvm_service.env")
    assert stat.S_IMODE(os.stat(env_file).st_mode) == 0o600
    assert open(env_file).read() == (
        'HTTPS_PROXY="http://u:p%40ss@127.0.0.1:3128"\nNO_PROXY="a \\"b\\""\n')


def test_systemd_install_is_idempotent_and_reloads_once(spec, tmp_path):
    """A second install with the same spec writes nothing and runs no daemon-reload."""
    recorder = Recorder()
    unit = Systemd(str(tmp_path), recorder)
    assert unit.install(spec) is True
    assert unit.install(spec) is False
    assert recorder.calls == [["systemctl", "daemon-reload"]]
    moved = ServiceSpec(str(tmp_path / "ext-3.1.1"), spec.state_dir, spec.log_dir)
    assert unit.install(moved) is True
    assert str(tmp_path / "ext-3.1.1" / "bin" / "akvvm") in unit_file(tmp_path)
    proxied = ServiceSpec(moved.extension_dir, spec.state_dir, spec.log_dir,
                          (("HTTPS_PROXY", "http://127.0.0.1:3128"),))
    assert unit.install(proxied) is True


def unit_file(folder) -> str:
    return (folder / supervisor.UNIT_NAME).read_text()


def test_systemd_restart_enables_and_remove_deletes_the_unit(spec, tmp_path):
    """restart = enable + restart; remove = disable --now, delete the file, daemon-reload."""
    recorder = Recorder()
    unit = Systemd(str(tmp_path), recorder)
    unit.install(spec)
    unit.restart(spec)
    unit.remove(spec)
    assert recorder.calls[1:] == [
        ["systemctl", "enable", supervisor.UNIT_NAME],
        ["systemctl", "restart", supervisor.UNIT_NAME],
        ["systemctl", "disable", "--now", supervisor.UNIT_NAME],
        ["systemctl", "daemon-reload"]]
    assert not (tmp_path / supervisor.UNIT_NAME).exists()


def test_choose_systemd_only_where_it_runs(tmp_path):
    """/run/systemd/system decides; AKVVM_SUPERVISOR overrides in either direction."""
    missing = str(tmp_path / "nope")
    assert supervisor.choose({}, marker=missing).kind == "daemon"
    assert supervisor.choose({}, marker=str(tmp_path)).kind == "systemd"
    assert supervisor.choose({"AKVVM_SUPERVISOR": "daemon"}, marker=str(tmp_path)).kind == "daemon"
    assert supervisor.choose({"AKVVM_SUPERVISOR": "systemd"}, marker=missing).kind == "systemd"


def test_spec_passes_proxies_and_akvvm_variables_only(tmp_path):
    """The service gets proxies, CA bundles and AKVVM_* variables, nothing else of enable's env."""
    made = supervisor.spec_for("/e", "/s", "/l", {
        "HTTPS_PROXY": "http://p:1", "AKVVM_BACKOFF_SCALE": "0.01", "SECRET_THING": "x",
        "ConfigSequenceNumber": "3", "AKVVM_SUPERVISOR": "daemon"})
    assert made.environment == (("AKVVM_BACKOFF_SCALE", "0.01"), ("HTTPS_PROXY", "http://p:1"))


def test_spec_passes_azure_identity_endpoint_variables(tmp_path):
    """An Arc machine's IDENTITY_ENDPOINT/IMDS_ENDPOINT reach the service (daemon or unit)."""
    made = supervisor.spec_for("/e", "/s", "/l", {
        "IDENTITY_ENDPOINT": "http://localhost:40342/metadata/identity/oauth2/token",
        "IMDS_ENDPOINT": "http://localhost:40342", "AZURE_CLIENT_ID": "c", "IDENTITY_HEADER": "h"})
    assert dict(made.environment) == {
        "AZURE_CLIENT_ID": "c", "IDENTITY_ENDPOINT":
        "http://localhost:40342/metadata/identity/oauth2/token",
        "IMDS_ENDPOINT": "http://localhost:40342"}


def test_daemon_starts_detached_reloads_and_stops(spec):
    """A live daemon: own session, pidfile pid is ours, SIGHUP delivered, SIGTERM stops it."""
    daemon = Daemon(start_timeout=10)
    daemon.restart(spec)
    pid = daemon.pid(spec)
    assert pid is not None and daemon.is_running(spec)
    assert os.getsid(pid) != os.getsid(0)
    assert open(os.path.join(spec.state_dir, "env")).read() == "http://127.0.0.1:3128"
    daemon.reload(spec)
    assert wait_until(lambda: hups(spec) == 1)
    daemon.stop(spec)
    assert not daemon.is_running(spec)
    assert service_pids(spec) == []
    assert not os.path.exists(spec.pidfile)


def test_daemon_restart_leaves_exactly_one_instance(spec):
    """Restarting replaces the process: a new pid, the old one gone."""
    daemon = Daemon(start_timeout=10)
    daemon.restart(spec)
    first = daemon.pid(spec)
    daemon.restart(spec)
    second = daemon.pid(spec)
    assert first != second
    assert service_pids(spec) == [second]


def test_stale_pidfile_is_never_signalled(spec):
    """A pidfile naming a live process that is not our service: not running, not killed."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with open(spec.pidfile, "w") as handle:
            handle.write(str(bystander.pid))
        daemon = Daemon(start_timeout=10)
        assert not daemon.is_running(spec)
        daemon.stop(spec)
        assert bystander.poll() is None
        assert not os.path.exists(spec.pidfile)
        daemon.restart(spec)
        assert daemon.pid(spec) not in (None, bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_daemon_install_detects_a_changed_definition(spec, tmp_path):
    """A moved extension dir or a changed proxy changes the recorded definition."""
    daemon = Daemon()
    assert daemon.install(spec) is True
    assert daemon.install(spec) is False
    moved = ServiceSpec(spec.extension_dir, spec.state_dir, spec.log_dir,
                        (("HTTPS_PROXY", "http://127.0.0.1:9999"),))
    assert daemon.install(moved) is True


def test_daemon_that_never_comes_up_is_an_error(spec):
    """A launcher that exits at once makes restart fail with a pointer to the logs."""
    launcher = os.path.join(spec.extension_dir, "bin", "akvvm")
    with open(launcher, "w") as handle:
        handle.write("#!/bin/sh\nexit 3\n")
    with pytest.raises(supervisor.SupervisorError, match="did not start"):
        Daemon(start_timeout=1).restart(spec)


def test_a_service_ignoring_sigterm_is_killed_after_the_stop_timeout(spec):
    """stop escalates to SIGKILL when SIGTERM is ignored, and leaves no process behind."""
    launcher = os.path.join(spec.extension_dir, "bin", "akvvm")
    source = FAKE_SERVICE.format(python=sys.executable).replace(
        "signal.signal(signal.SIGTERM, term)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    with open(launcher, "w") as handle:
        handle.write(source)
    daemon = Daemon(start_timeout=10, stop_timeout=0.5)
    daemon.restart(spec)
    started = time.monotonic()
    daemon.stop(spec)
    assert time.monotonic() - started < 5
    assert service_pids(spec) == [] and not daemon.is_running(spec)


def test_stop_never_kills_a_process_that_stopped_being_our_service(spec):
    """A pid that turns into something else after SIGTERM (here: exec of `sleep`, still
    ignoring SIGTERM) is not ours any more: stop returns without SIGKILL."""
    launcher = os.path.join(spec.extension_dir, "bin", "akvvm")
    source = FAKE_SERVICE.format(python=sys.executable).replace(
        "    os.unlink(pidfile)\n    sys.exit(0)",
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "    os.execv('/bin/sleep', ['sleep', '30'])")
    with open(launcher, "w") as handle:
        handle.write(source)
    daemon = Daemon(start_timeout=10, stop_timeout=5)
    daemon.restart(spec)
    pid = daemon.pid(spec)
    assert pid is not None
    try:
        started = time.monotonic()
        daemon.stop(spec)
        assert time.monotonic() - started < 4
        assert os.path.exists(f"/proc/{pid}") and supervisor.cmdline(pid)[0] == "sleep"
    finally:
        os.kill(pid, signal.SIGKILL)
