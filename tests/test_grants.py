"""The ancestor-ACL ledger: the service records traversal grants, uninstall takes them back."""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from akvvm_ext.acl import TraversalGrant
from handler import grants, lifecycle
from tests.standins.certfactory import Chain
from tests.test_service_main import Layout, layout, spawn, succeeded_with, wait_until

__all__ = ["layout", "spawn"]  # fixtures shared with the service tests


def test_ledger_records_each_grant_once(tmp_path: Path) -> None:
    """Recording the same grant twice keeps one row; the file is private to root."""
    record = grants.recorder(str(tmp_path))
    first = TraversalGrant("/srv/a", "user", 65534)
    record([first])
    record([first, TraversalGrant("/srv", "group", 100)])
    assert grants.load(str(tmp_path)) == [first, TraversalGrant("/srv", "group", 100)]
    assert os.stat(tmp_path / grants.LEDGER).st_mode & 0o777 == 0o600


def test_damaged_ledger_counts_as_empty(tmp_path: Path) -> None:
    """A truncated or foreign ledger never stops uninstall."""
    (tmp_path / grants.LEDGER).write_text('[["/srv", "user"')
    assert grants.load(str(tmp_path)) == []
    (tmp_path / grants.LEDGER).write_text(json.dumps({"not": "a list"}))
    assert grants.load(str(tmp_path)) == []


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv],
                          capture_output=True, text=True, check=False)


def _acl_users(path: Path) -> str:
    return subprocess.run(["getfacl", "-cp", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_service_records_ancestor_grants_and_uninstall_reverts_them(
        layout: Layout, spawn: Callable[..., Any], chain: Callable[..., Chain]) -> None:
    """A store under a 0700 directory: the service opens the way for `nobody`, the ledger
    remembers it, and reverting it closes the way again (the certificate stays)."""
    locked = layout.root / "locked"
    locked.mkdir(mode=0o700)
    store = locked / "store"
    layout.kv.add_certificate("web", chain())
    raw = layout.raw()
    raw["secretsManagementSettings"]["observedCertificates"] = [
        {"url": f"{layout.kv.url}/secrets/web", "certificateStoreLocation": str(store),
         "acls": [{"user": "nobody"}]}]
    layout.write(raw)
    spawn()
    wait_until(lambda: succeeded_with(layout, 1))
    assert _as_nobody("cat", str(store / "localhost.web")).returncode == 0
    recorded = grants.load(str(layout.state))
    assert TraversalGrant(str(locked), "user", 65534) in recorded
    assert "user:nobody:--x" in _acl_users(locked)

    lifecycle.revert_ancestor_grants(str(layout.state))
    assert "user:nobody" not in _acl_users(locked)
    assert _as_nobody("cat", str(store / "localhost.web")).returncode != 0
    assert (store / "localhost.web").is_symlink()
