"""handler.lifecycle + handler.main: the five commands, their statuses and exit codes.

The supervisor is the real daemon path; bin/akvvm is a stand-in that behaves like the service
towards it (pidfile, SIGHUP, SIGTERM), so these tests need no Key Vault.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from handler import __main__ as entry_point
from handler import lifecycle, status, supervisor
from handler.environment import EXTENSION_NAME, Host
from handler.main import main
from tests.test_supervisor import FAKE_SERVICE
from tests.waiting import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"secretsManagementSettings": {
    "pollingIntervalInS": "3600", "certificateStoreLocation": "/tmp/akvvm-lifecycle-store",
    "observedCertificates": ["https://localhost:8443/secrets/web"],
    "additionalVaultDnsSuffixes": ["localhost"]},
    "authenticationSettings": {"msiEndpoint": "http://127.0.0.1:9/metadata/identity"}}


class Tree:
    """A fake /var/lib/waagent with one extension version laid out as the agent does."""

    def __init__(self, root: str, version: str = "3.1.0") -> None:
        self.lib = os.path.join(root, "waagent")
        self.logs = os.path.join(root, "log")
        self.ext = self.version_dir(version)
        self.state = os.path.join(self.lib, f"{EXTENSION_NAME}.State")
        self.environ = {"AZURE_GUEST_AGENT_EXTENSION_PATH": self.ext,
                        "AKVVM_SUPERVISOR": "daemon", "PATH": os.environ["PATH"]}

    def version_dir(self, version: str) -> str:
        ext = os.path.join(self.lib, f"{EXTENSION_NAME}-{version}")
        for sub in ("config", "status", "bin"):
            os.makedirs(os.path.join(ext, sub), exist_ok=True)
        launcher = os.path.join(ext, "bin", "akvvm")
        with open(launcher, "w") as handle:
            handle.write(FAKE_SERVICE.format(python=sys.executable))
        os.chmod(launcher, 0o755)
        folders = {"logFolder": self.logs, "configFolder": os.path.join(ext, "config"),
                   "statusFolder": os.path.join(ext, "status"),
                   "heartbeatFile": os.path.join(ext, "heartbeat.log")}
        with open(os.path.join(ext, "HandlerEnvironment.json"), "w") as handle:
            json.dump([{"name": EXTENSION_NAME, "version": 1.0,
                        "handlerEnvironment": folders}], handle)
        return ext

    def settings(self, seq: int, public: object, raw: str | None = None) -> None:
        body = raw if raw is not None else json.dumps({"runtimeSettings": [{"handlerSettings": {
            "publicSettings": public}}]})
        with open(os.path.join(self.ext, "config", f"{seq}.settings"), "w") as handle:
            handle.write(body)

    def run(self, operation: str, seq: int) -> int:
        return main([operation], {**self.environ, "ConfigSequenceNumber": str(seq)})

    def status(self, seq: int) -> dict:
        with open(os.path.join(self.ext, "status", f"{seq}.status")) as handle:
            return json.load(handle)[0]["status"]

    def config(self) -> dict:
        with open(os.path.join(self.state, "config.json")) as handle:
            return json.load(handle)

    @property
    def spec(self) -> supervisor.ServiceSpec:
        return supervisor.ServiceSpec(self.ext, self.state, self.logs)

    def pid(self) -> int | None:
        return supervisor.Daemon().pid(self.spec)


@pytest.fixture
def tree(tmp_path):
    """The fake agent tree; every service it started is killed afterwards."""
    made = Tree(str(tmp_path))
    yield made
    for entry in os.listdir("/proc"):
        if entry.isdigit() and made.state in " ".join(supervisor.cmdline(int(entry))):
            os.kill(int(entry), signal.SIGKILL)


@pytest.mark.parametrize(("old", "new", "redefined", "running", "reported", "action"), [
    (None, {"seq": 1}, False, False, False, "restart"),
    ({"seq": 1, "settings": 1}, {"seq": 1, "settings": 1}, False, True, True, "unchanged"),
    ({"seq": 1, "settings": 1}, {"seq": 2, "settings": 1}, False, True, False, "reload"),
    ({"seq": 1, "settings": 1}, {"seq": 2, "settings": 2}, False, True, True, "restart"),
    ({"seq": 1, "settings": 1}, {"seq": 1, "settings": 1}, False, False, True, "restart"),
    ({"seq": 1, "settings": 1}, {"seq": 1, "settings": 1}, True, True, True, "restart"),
    ({"seq": 1, "settings": 1}, {"seq": 1, "settings": 1}, False, True, False, "restart"),
])
def test_decide(old, new, redefined, running, reported, action):
    """Restart only when what the service does changed (or its status file vanished); reload
    when only the seq moved."""
    assert lifecycle.decide(old, new, redefined, running, reported) == action


def test_enable_writes_a_private_config_and_starts_the_service(tree):
    """Valid settings: config.json 0600 in the 0700 state dir, one service, transitioning first."""
    tree.settings(1, GOOD)
    assert tree.run("enable", 1) == 0
    assert tree.config()["settings"] == GOOD
    assert tree.config()["extensionPath"] == tree.ext
    assert stat.S_IMODE(os.stat(os.path.join(tree.state, "config.json")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tree.state).st_mode) == 0o700
    assert tree.pid() is not None
    assert tree.status(1)["status"] == "transitioning"
    assert tree.status(1)["formattedMessage"]["message"] == lifecycle.STARTING


def test_enable_again_changes_nothing(tree):
    """The same seq and settings: same pid, status file untouched, no file of the state dir
    written (enable runs on every goal state: it must cost no disk write)."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    pid = tree.pid()
    status_file = os.path.join(tree.ext, "status", "1.status")
    with open(status_file, "w") as handle:  # what the service would have reported by now
        json.dump([{"status": {"status": "success"}}], handle)
    before = state_files(tree)
    assert tree.run("enable", 1) == 0
    assert tree.pid() == pid
    assert json.load(open(status_file))[0]["status"]["status"] == "success"
    assert state_files(tree) == before


def state_files(tree) -> dict[str, tuple[int, int]]:
    """Every file of the state dir with its inode and mtime."""
    found = {name: os.stat(os.path.join(tree.state, name)) for name in os.listdir(tree.state)}
    return {name: (info.st_ino, info.st_mtime_ns) for name, info in found.items()}


def test_new_seq_with_same_settings_reloads_without_restart(tree):
    """A new goal state with identical settings: same pid, SIGHUP, config points at the new seq."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    pid = tree.pid()
    tree.settings(2, GOOD)
    assert tree.run("enable", 2) == 0
    assert tree.pid() == pid
    assert tree.config()["seq"] == 2
    assert tree.status(2)["status"] == "transitioning"
    assert wait_until(lambda: os.path.exists(os.path.join(tree.state, "hups")))


def test_changed_settings_restart_the_service_once(tree):
    """Changed settings: a new service process with the new config."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    pid = tree.pid()
    changed = json.loads(json.dumps(GOOD))
    changed["secretsManagementSettings"]["pollingIntervalInS"] = "600"
    tree.settings(2, changed)
    assert tree.run("enable", 2) == 0
    assert tree.pid() not in (None, pid)
    assert tree.config()["settings"]["secretsManagementSettings"]["pollingIntervalInS"] == "600"


def test_invalid_settings_report_every_problem_and_keep_the_service(tree):
    """Invalid settings: exit 53, an error status with each problem, last good config kept."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    pid = tree.pid()
    tree.settings(2, {"secretsManagementSettings": {
        "pollingIntervalInS": "0", "observedCertificates": [
            "http://myvault.vault.azure.net/secrets/a",
            "https://myvault.vault.azure.net/certificates/b"]}})
    assert tree.run("enable", 2) == lifecycle_exit_settings()
    message = tree.status(2)["formattedMessage"]["message"]
    assert tree.status(2)["status"] == "error"
    assert tree.status(2)["code"] == lifecycle_exit_settings()  # the status says the exit code
    assert "observedCertificates[0]" in message and "observedCertificates[1]" in message
    assert "/secrets/b" in message  # the hint gives the /secrets/ form
    assert tree.config()["seq"] == 1 and tree.pid() == pid


def lifecycle_exit_settings() -> int:
    from handler.main import EXIT_SETTINGS
    return EXIT_SETTINGS


def test_empty_settings_file_is_a_clear_error(tree):
    """A zero-byte settings file: an error status in words, no traceback, no service."""
    tree.settings(0, None, raw="")
    assert tree.run("enable", 0) != 0
    status = tree.status(0)
    assert status["status"] == "error"
    assert "Traceback" not in status["formattedMessage"]["message"]
    assert tree.pid() is None


def test_disable_stops_and_always_exits_zero(tree):
    """disable stops the service; even a broken environment gives exit 0."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    assert tree.run("disable", 1) == 0
    assert tree.pid() is None
    with open(os.path.join(tree.ext, "HandlerEnvironment.json"), "w") as handle:
        handle.write("not json")
    assert tree.run("disable", 5) == 0


def test_uninstall_removes_service_and_state_but_not_certificates(tree, tmp_path):
    """A true uninstall: no service, no state dir; the certificate store is never touched."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "vault.web.v1").write_text("pem")
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    assert tree.run("disable", 1) == 0
    assert tree.run("uninstall", 1) == 0
    assert tree.pid() is None and not os.path.exists(tree.state)
    assert (store / "vault.web.v1").read_text() == "pem"


def test_uninstall_during_an_upgrade_keeps_service_and_state(tree):
    """The old version's uninstall, with a newer version dir beside it, removes nothing."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    tree.version_dir("3.2.0")
    assert tree.run("uninstall", 2) == 0
    assert os.path.exists(os.path.join(tree.state, "config.json"))
    assert tree.pid() is not None


def test_update_marker_protects_the_old_dir_during_a_downgrade(tree):
    """update announces the incoming version; the outgoing one's uninstall then keeps the state."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    older = Tree(os.path.dirname(tree.lib), "3.0.0")
    environ = {**older.environ, "AZURE_GUEST_AGENT_UPDATING_FROM_VERSION": "3.1.0"}
    assert main(["update"], environ) == 0
    assert tree.run("uninstall", 1) == 0
    assert os.path.exists(os.path.join(tree.state, "config.json"))


def test_install_without_openssl_exits_52_with_an_error_status(tree, monkeypatch, tmp_path):
    """install names the missing dependency in an error status and exits 52."""
    tree.settings(0, GOOD)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tree.run("install", 0) == 52
    assert "openssl" in tree.status(0)["formattedMessage"]["message"]


def test_install_missing_modules_on_an_unsupported_machine_exits_51(tree, monkeypatch):
    """No wheels for this machine (ppc64le here): unsupported OS, 51, the machine named."""
    monkeypatch.setattr(lifecycle.environment, "this_host",
                        lambda: Host("linux", "ppc64le", "glibc 2.35", "3.10.12"))
    monkeypatch.setattr(lifecycle, "REQUIRED_MODULES", ("akvvm_no_such_module",))
    assert tree.run("install", 0) == 51
    message = tree.status(0)["formattedMessage"]["message"]
    assert "akvvm_no_such_module" in message and "ppc64le" in message


def test_a_module_failing_to_import_late_exits_52_naming_it(tree, monkeypatch):
    """An ImportError inside a command (a lazily imported .so): 52 and the module named."""
    def broken(ctx):
        raise ModuleNotFoundError("No module named 'posix1e'", name="posix1e")
    monkeypatch.setitem(lifecycle.OPERATIONS, "enable", broken)
    assert tree.run("enable", 2) == 52
    assert "posix1e" in tree.status(2)["formattedMessage"]["message"]


def test_the_dependency_guard_writes_the_status_shape_and_disable_still_stops(tree):
    """Without its dependencies the entry point writes an error status shaped like
    handler.status's, and disable still stops a running service and exits 0."""
    tree.settings(1, GOOD)
    tree.run("enable", 1)
    environ = {**tree.environ, "ConfigSequenceNumber": "2"}
    err = ModuleNotFoundError("No module named 'fluent'", name="fluent")
    assert entry_point.without_dependencies("enable", environ, err) == 52
    written = json.load(open(os.path.join(tree.ext, "status", "2.status")))
    reference = status.document("Enable", "error", "x", now=datetime.now(timezone.utc))
    assert written[0].keys() == reference[0].keys()
    assert written[0]["status"].keys() == reference[0]["status"].keys()
    assert "fluent" in written[0]["status"]["formattedMessage"]["message"]
    assert tree.pid() is not None
    assert entry_point.without_dependencies("disable", environ, err) == 0
    assert tree.pid() is None


def test_install_with_prerequisites_succeeds(tree):
    """On this machine everything is there: exit 0 and the state dir exists."""
    assert tree.run("install", 0) == 0
    assert os.path.isdir(tree.state)


def test_unknown_operation_is_a_usage_error(tree, capsys):
    """A wrong argument prints the usage and exits 2."""
    assert main(["restart"], tree.environ) == 2
    assert "usage" in capsys.readouterr().err


def test_two_enables_at_once_start_one_service(tree):
    """Concurrent enables (separate processes) end with exactly one service process."""
    tree.settings(1, GOOD)
    env = {**tree.environ, "ConfigSequenceNumber": "1", "PYTHONPATH": REPO}
    procs = [subprocess.Popen([sys.executable, "-m", "handler", "enable"], env=env)
             for _ in range(3)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    running = [int(e) for e in os.listdir("/proc") if e.isdigit()
               and supervisor.is_service_cmdline(supervisor.cmdline(int(e)), tree.spec)]
    assert running == [tree.pid()]

