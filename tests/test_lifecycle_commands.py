"""handler.lifecycle + handler.main, the other commands: install, update, disable, uninstall,
and the exit codes when dependencies are missing (the fake tree: tests/lifecycle_tree.py)."""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone

import pytest

from handler import __main__ as entry_point
from handler import lifecycle, status
from handler.environment import Host
from handler.main import main
from tests.lifecycle_tree import GOOD, Tree, kill_services


@pytest.fixture
def tree(tmp_path):
    """The fake agent tree; every service it started is killed afterwards."""
    made = Tree(str(tmp_path))
    yield made
    kill_services(made)


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
