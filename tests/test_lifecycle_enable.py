"""handler.lifecycle + handler.main, enable: when to start, reload or restart the service, and
how bad settings are reported (the tree and its stand-in service: tests/lifecycle_tree.py)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from handler import lifecycle, supervisor
from handler.main import EXIT_SETTINGS
from tests.lifecycle_tree import GOOD, Tree, kill_services
from tests.waiting import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tree(tmp_path):
    """The fake agent tree; every service it started is killed afterwards."""
    made = Tree(str(tmp_path))
    yield made
    kill_services(made)


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
    assert tree.run("enable", 2) == EXIT_SETTINGS
    message = tree.status(2)["formattedMessage"]["message"]
    assert tree.status(2)["status"] == "error"
    assert tree.status(2)["code"] == EXIT_SETTINGS  # the status says the exit code
    assert "observedCertificates[0]" in message and "observedCertificates[1]" in message
    assert "/secrets/b" in message  # the hint gives the /secrets/ form
    assert tree.config()["seq"] == 1 and tree.pid() == pid


def test_refused_settings_after_a_disable_run_the_last_good_ones_again(tree):
    """An upgrade's disable stopped the service, then the new enable refuses its settings: exit
    53 with the error for the agent, and the last good settings run again meanwhile."""
    tree.settings(1, GOOD)
    assert tree.run("enable", 1) == 0
    assert tree.run("disable", 1) == 0 and tree.pid() is None
    tree.settings(2, {"secretsManagementSettings": {"pollingIntervalInS": "x"}})
    assert tree.run("enable", 2) == EXIT_SETTINGS
    assert tree.status(2)["status"] == "error"
    assert tree.pid() is not None
    kept = tree.config()
    assert kept["settings"] == GOOD and kept["seq"] == 1 and kept["extensionPath"] == tree.ext
    assert kept["statusFolder"] != os.path.join(tree.ext, "status")  # seq 2 keeps its error


def test_empty_settings_file_is_a_clear_error(tree):
    """A zero-byte settings file: an error status in words, no traceback, no service."""
    tree.settings(0, None, raw="")
    assert tree.run("enable", 0) != 0
    status = tree.status(0)
    assert status["status"] == "error"
    assert "Traceback" not in status["formattedMessage"]["message"]
    assert tree.pid() is None


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
