"""update and uninstall when the vendored dependencies do not import (the old zip has no wheels
for the OS's new python: the usual reason to upgrade). They need the standard library only, so
they run as usual and exit 0; install and enable still exit 52. Most tests run the real
`python3 -S -s -m handler`, where third-party imports really fail (no site-packages)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from handler import __main__ as entry_point
from handler import grants
from tests.lifecycle_tree import GOOD, Tree, kill_services

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534


@pytest.fixture
def tree(tmp_path):
    """The fake agent tree; every service it started is killed afterwards."""
    made = Tree(str(tmp_path))
    yield made
    kill_services(made)


def bare(operation: str, environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python3 -S -s -m handler <operation>`: the package on PYTHONPATH, no site-packages."""
    return subprocess.run([sys.executable, "-S", "-s", "-m", "handler", operation],
                          env={**environ, "PYTHONPATH": REPO}, cwd="/", capture_output=True,
                          text=True, timeout=60)


def _environ(tree: Tree, seq: int, **extra: str) -> dict[str, str]:
    return {**tree.environ, "ConfigSequenceNumber": str(seq), **extra}


def _acl_users(path: str) -> str:
    return subprocess.run(["getfacl", "-c", "-n", path], capture_output=True, text=True,
                          check=True).stdout


def test_old_versions_uninstall_during_an_upgrade_exits_zero_and_keeps_everything(tree):
    """The outgoing version's uninstall without its dependencies: exit 0, the service and
    state stay for the successor, and the status names the successor."""
    tree.settings(1, GOOD)
    assert tree.run("enable", 1) == 0
    pid = tree.pid()
    tree.version_dir("3.2.0")
    done = bare("uninstall", _environ(tree, 2))
    assert done.returncode == 0, done.stderr
    assert "Missing dependency" in done.stderr
    assert tree.pid() == pid and os.path.exists(os.path.join(tree.state, "config.json"))
    reported = tree.status(2)
    assert reported["status"] == "success" and reported["code"] == 0
    assert "3.2.0 takes over" in reported["formattedMessage"]["message"]


def test_real_removal_without_dependencies_stops_the_service_and_removes_the_state(tree):
    """A true uninstall without dependencies still stops the service and deletes the state."""
    tree.settings(1, GOOD)
    assert tree.run("enable", 1) == 0
    assert tree.pid() is not None
    done = bare("uninstall", _environ(tree, 1))
    assert done.returncode == 0, done.stderr
    assert tree.pid() is None and not os.path.exists(tree.state)
    assert "service removed" in tree.status(1)["formattedMessage"]["message"]


def test_downgrades_update_without_dependencies_protects_the_outgoing_state(tree):
    """The older target's update writes the marker, so the newer version's uninstall keeps
    the service and state."""
    tree.settings(1, GOOD)
    assert tree.run("enable", 1) == 0
    older = Tree(os.path.dirname(tree.lib), "3.0.0")
    done = bare("update", _environ(older, 2, AZURE_GUEST_AGENT_UPDATING_FROM_VERSION="3.1.0"))
    assert done.returncode == 0, done.stderr
    assert "from 3.1.0 to 3.0.0" in older.status(2)["formattedMessage"]["message"]
    assert tree.run("uninstall", 2) == 0
    assert tree.pid() is not None and os.path.exists(os.path.join(tree.state, "config.json"))


def test_uninstall_without_pylibacl_reverts_ancestor_grants_with_setfacl(tree, tmp_path):
    """No pylibacl in a bare python: the ledger's grants are taken back through setfacl."""
    ancestor = tmp_path / "ancestor"
    ancestor.mkdir(mode=0o700)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:x", str(ancestor)], check=True)
    os.makedirs(tree.state, mode=0o700)
    grants.recorder(tree.state)([grants.TraversalGrant(str(ancestor), "user", NOBODY)])
    done = bare("uninstall", _environ(tree, 1))
    assert done.returncode == 0, done.stderr
    assert f"user:{NOBODY}" not in _acl_users(str(ancestor))
    assert "left" not in tree.status(1)["formattedMessage"]["message"]


def test_uninstall_without_any_acl_tool_leaves_the_grants_and_says_where(tree, tmp_path):
    """Neither pylibacl nor setfacl: uninstall still exits 0, and its status names the
    directories whose grants it had to leave."""
    ancestor = tmp_path / "ancestor"
    ancestor.mkdir(mode=0o700)
    subprocess.run(["setfacl", "-m", f"u:{NOBODY}:x", str(ancestor)], check=True)
    os.makedirs(tree.state, mode=0o700)
    grants.recorder(tree.state)([grants.TraversalGrant(str(ancestor), "user", NOBODY)])
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    done = bare("uninstall", _environ(tree, 1, PATH=str(no_tools)))
    assert done.returncode == 0, done.stderr
    message = tree.status(1)["formattedMessage"]["message"]
    assert f"grant(s) left on {ancestor}" in message and "setfacl" in message
    assert f"user:{NOBODY}:--x" in _acl_users(str(ancestor))


@pytest.mark.parametrize("operation", ["install", "enable"])
def test_install_and_enable_without_dependencies_still_exit_52(tree, operation):
    """The guard is unchanged for install and enable: exit 52 and an error status."""
    tree.settings(3, GOOD)
    done = bare(operation, _environ(tree, 3))
    assert done.returncode == 52, done.stderr
    reported = tree.status(3)
    assert reported["status"] == "error" and reported["code"] == 52
    assert "Missing dependency" in reported["formattedMessage"]["message"]


def test_a_failing_uninstall_without_dependencies_reports_an_error(tree, monkeypatch):
    """An uninstall that cannot run (state dir lock held too long) exits 1 with an error
    status, as handler.main would, instead of claiming success."""
    from handler import lifecycle

    def stuck(ctx):
        raise lifecycle.LifecycleError("another lifecycle command held the lock")
    monkeypatch.setitem(sys.modules, "handler.main", None)
    monkeypatch.setitem(lifecycle.OPERATIONS, "uninstall", stuck)
    assert entry_point.run(["uninstall"], _environ(tree, 4)) == 1
    reported = tree.status(4)
    assert reported["status"] == "error" and "held the lock" in json.dumps(reported)


@pytest.mark.parametrize("raised", ["AttributeError(\"module 'asyncio' has no attribute 'x'\")",
                                    "SyntaxError('invalid syntax')"])
def test_a_dependency_that_breaks_with_another_error_is_handled_the_same(tree, tmp_path, raised):
    """A library raising AttributeError or SyntaxError at import (an old library on a newer
    python): disable and uninstall still exit 0, enable exits 52 with a status, no traceback."""
    broken = tmp_path / "broken"
    for package in ("jsonschema", "tenacity", "cryptography"):
        (broken / package).mkdir(parents=True)
        (broken / package / "__init__.py").write_text(f"raise {raised}\n")
    tree.settings(1, GOOD)

    def run(operation: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-s", "-m", "handler", operation],
                              env={**_environ(tree, 1), "PYTHONPATH": f"{broken}:{REPO}"},
                              cwd="/", capture_output=True, text=True, timeout=60)

    enable = run("enable")
    assert enable.returncode == 52 and "Traceback" not in enable.stderr
    assert tree.status(1)["status"] == "error"
    for operation in ("disable", "uninstall"):
        done = run(operation)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
