"""Regressions found in review: a failed rotation stays failed, expiry surfaces later, and a
removed ACL is taken back."""
from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from akvvm_ext import acl, identity, store, sync
from akvvm_ext.errors import StoreError
from akvvm_ext.keyvault import Vaults
from akvvm_ext.listing import ChangeDetector
from akvvm_ext.model import CertResult, Identity, Outcome, Settings
from tests.standins.certfactory import make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin
from tests.test_sync import NOW, getfacl, settings, vaults  # noqa: F401 - the fixture

NAMES = ("a", "b", "c")


class _Aged:
    """Three certificates created an hour ago (settled), synced once with a ChangeDetector."""

    def __init__(self, kv: KeyVaultStandin, client: Vaults, store_dir: Path,
                 clock: list[float]) -> None:
        self.kv, self.vaults, self.detector, self.clock = kv, client, ChangeDetector(), clock
        for name in NAMES:
            kv.add_certificate(name, make_chain())
        self.wanted: Settings = settings(kv, store_dir, *NAMES)
        first = self.run()
        assert {r.outcome for r in first} == {Outcome.INSTALLED}
        self.v1 = first[1].version
        clock[0] += 10  # a rotation from now on is seen in the listing as a later update

    def run(self) -> list[CertResult]:
        return sync.sync(self.wanted, self.vaults, datetime.now(timezone.utc),
                         detector=self.detector)


@pytest.fixture
def aged(azure_env: dict[str, str], imds: ImdsStandin, tmp_path: Path) -> Iterator[_Aged]:
    clock = [time.time() - 3600]
    with KeyVaultStandin(accept_token=imds.token_issued, clock=lambda: clock[0]) as kv:
        made = Vaults(identity.credential(Identity(imds.url + "/metadata/identity")),
                      connection_verify=kv.ca_path)
        yield _Aged(kv, made, tmp_path / "store", clock)
        made.close()


def _still_failing_then_installs(aged: _Aged, failed: list[CertResult]) -> None:
    assert failed[1].outcome is Outcome.FAILED and failed[1].version == aged.v1
    aged.kv.reset_counters()
    again = aged.run()
    assert again[1].outcome is Outcome.FAILED  # not "unchanged" while v1 is served
    assert aged.kv.count("b") == 1  # re-fetched, not masked by the listing
    new = aged.kv.add_certificate("b", make_chain())
    fixed = aged.run()
    assert fixed[1].outcome is Outcome.INSTALLED and fixed[1].version == new


def test_rotation_with_bad_content_is_retried_not_masked(aged: _Aged) -> None:
    """A rotation whose content cannot be converted keeps failing on later listed passes."""
    aged.kv.set_secret("b", "not a certificate", content_type="application/x-pem-file")
    _still_failing_then_installs(aged, aged.run())


def test_rotation_on_full_store_is_retried_not_masked(aged: _Aged) -> None:
    """A rotation that a full disk stopped is fetched and tried again on the next pass."""
    aged.kv.add_certificate("b", make_chain())

    def full(*_: Any, **__: Any) -> store.Change:
        raise StoreError("cannot write the store: No space left on device.", "Free space.")

    with mock.patch.object(sync.store, "write_version", full):
        failed = aged.run()
    assert failed[1].outcome is Outcome.FAILED
    aged.kv.reset_counters()
    again = aged.run()  # the disk has space again: the rotation lands
    assert again[1].outcome is Outcome.INSTALLED and again[1].version != aged.v1
    assert aged.kv.count("b") == 1


def test_expiry_after_install_is_warned_on_unchanged_passes(
        vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path) -> None:  # noqa: F811
    """A certificate valid at install but expired later gets the expiry warning while unchanged."""
    now = datetime.now(timezone.utc)
    kv.add_certificate("web", make_chain(not_after=now + timedelta(days=1)))
    wanted = settings(kv, tmp_path / "store", "web")
    [first] = sync.sync(wanted, vaults, now)
    assert first.outcome is Outcome.INSTALLED and not first.warnings
    [later] = sync.sync(wanted, vaults, now + timedelta(days=3))
    assert later.outcome is Outcome.UNCHANGED
    assert any("expired on" in w for w in later.warnings)
    [renewed_clock] = sync.sync(wanted, vaults, now)  # the warning follows the pass's time
    assert not renewed_clock.warnings


@pytest.fixture
def recorded() -> Iterator[list[acl.TraversalGrant]]:
    """The ancestor grants a test's sync passes made, taken back when it ends."""
    grants: list[acl.TraversalGrant] = []
    yield grants
    acl.revert(grants)


def _nobody_reads(link: str | None) -> bool:
    done = subprocess.run(["runuser", "-u", "nobody", "--", "cat", str(link)],
                          capture_output=True, check=False)
    return done.returncode == 0


@pytest.mark.parametrize("revoked", [{"acls": []}, {"aclEnabled": False}])
def test_revoked_acl_is_taken_back_after_a_restart(
        vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path,  # noqa: F811
        recorded: list[acl.TraversalGrant], revoked: dict[str, Any]) -> None:
    """Removing the user from acls, or aclEnabled false, leaves the link unreadable to it."""
    kv.add_certificate("web", make_chain())
    entry = {"name": "web", "acls": [{"user": "nobody"}]}
    [granted] = sync.sync(settings(kv, tmp_path / "store", entry), vaults, NOW,
                          record_grants=recorded.extend)
    assert _nobody_reads(granted.link) and "user:nobody:r--" in getfacl(granted.path or "")
    sync._MEMO.clear()  # a restarted service: the new settings come with a fresh process
    acls = revoked.get("acls", entry["acls"])
    flags = {k: v for k, v in revoked.items() if k != "acls"}
    wanted = settings(kv, tmp_path / "store", {**entry, "acls": acls}, **flags)
    [after] = sync.sync(wanted, vaults, NOW, record_grants=recorded.extend)
    assert after.outcome is Outcome.UNCHANGED and after.path == granted.path
    assert "nobody" not in getfacl(after.path or "") and "mask" not in getfacl(after.path or "")
    assert not _nobody_reads(after.link)


def test_acl_change_within_a_process_is_applied(
        vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path,  # noqa: F811
        recorded: list[acl.TraversalGrant]) -> None:
    """Without a restart too, a user taken out of acls can no longer read the link."""
    kv.add_certificate("web", make_chain())
    both = {"name": "web", "acls": [{"user": "nobody"}, {"user": "daemon"}]}
    sync.sync(settings(kv, tmp_path / "store", both), vaults, NOW,
              record_grants=recorded.extend)
    only_daemon = {"name": "web", "acls": [{"user": "daemon"}]}
    [after] = sync.sync(settings(kv, tmp_path / "store", only_daemon), vaults, NOW,
                        record_grants=recorded.extend)
    assert not _nobody_reads(after.link)
    assert "user:daemon:r--" in getfacl(after.path or "")


def test_revoked_acl_is_taken_back_from_older_versions_too(
        vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path,  # noqa: F811
        recorded: list[acl.TraversalGrant]) -> None:
    """Old versions stay on disk; a user taken out of acls cannot read them by their path."""
    kv.add_certificate("web", make_chain())
    entry = {"name": "web", "acls": [{"user": "nobody"}]}
    [first] = sync.sync(settings(kv, tmp_path / "store", entry), vaults, NOW,
                        record_grants=recorded.extend)
    kv.add_certificate("web", make_chain())
    [second] = sync.sync(settings(kv, tmp_path / "store", entry), vaults, NOW,
                         record_grants=recorded.extend)
    assert second.path != first.path and _nobody_reads(first.path)
    sync._MEMO.clear()  # a restarted service with the user taken out
    [after] = sync.sync(settings(kv, tmp_path / "store", {**entry, "acls": []}), vaults,
                        NOW, record_grants=recorded.extend)
    assert not _nobody_reads(after.path) and not _nobody_reads(first.path)
    assert "nobody" not in getfacl(first.path or "")
    assert os.path.isfile(first.path or "")  # kept, as every old version is


class _BrokenDetector(ChangeDetector):
    """A detector that cannot record what it is told (as with attributes it cannot read)."""

    def fetched(self, cert: Any, secret: Any, now: float) -> None:
        if secret is not None:
            raise ValueError("unreadable attributes")
        super().fetched(cert, secret, now)


def test_a_detector_failure_does_not_end_the_pass(
    vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    """Every certificate is still installed and reported when recording a baseline fails."""
    for name in NAMES:
        kv.add_certificate(name, make_chain())
    results = sync.sync(settings(kv, tmp_path / "store", *NAMES), vaults, NOW,
                        detector=_BrokenDetector())
    assert [r.outcome for r in results] == [Outcome.INSTALLED] * 3


def test_a_served_key_made_readable_by_others_is_written_private_again(
    vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    """chmod 644 (or a restored copy owned by someone else) of the served file is undone on the
    next pass, in the same process: the private key is 0600 and ours again, same content."""
    kv.add_certificate("web", make_chain())
    wanted = settings(kv, tmp_path / "store", "web")
    [first] = sync.sync(wanted, vaults, NOW)
    served = Path(str(first.path))
    content = served.read_bytes()
    served.chmod(0o644)
    os.chown(served, 65534, 65534)
    [again] = sync.sync(wanted, vaults, NOW)
    assert again.version == first.version and served.read_bytes() == content
    st = served.stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, os.geteuid())
