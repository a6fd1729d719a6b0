"""A store in a sync pass: one listing of it per pass (fsio.Scan), old versions pruned meanwhile,
a pinned version recognised whatever the case of its id, and a new store made durable."""
from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from akvvm_ext import fsio, store, sync
from akvvm_ext.keyvault import Secret, Vaults
from akvvm_ext.model import ObservedCertificate, Outcome
from akvvm_ext.settings import parse
from tests.standins.certfactory import PEM, make_chain, secret_value
from tests.standins.keyvault import KeyVaultStandin
from tests.test_store import PEM1, PEM2, V1, V2, install, observed
from tests.test_sync import NOW, settings, vaults  # noqa: F401 - the fixture

TOKEN = "0123456789abcdef"


def test_scan_gives_exactly_the_names_that_start_with_a_prefix(tmp_path: Path) -> None:
    """Names sharing a longer or shorter prefix are not mixed in; a missing directory is empty."""
    names = ["a.web", "a.web.1", "a.web.2", "a.webx.1", "a.we", ".a.web.1.tmp-x", "b.web.1"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    scan = fsio.Scan(str(tmp_path))
    assert scan.starting_with("a.web.") == ["a.web.1", "a.web.2"]
    assert scan.starting_with(".a.web.") == [".a.web.1.tmp-x"]
    assert scan.starting_with("c.") == []
    assert fsio.Scan(str(tmp_path / "missing")).starting_with("a") == []


def test_write_with_an_earlier_scan_removes_stale_temps_and_spares_newer_files(
    tmp_path: Path,
) -> None:
    """A scan taken before the write finds a killed writer's temp file and temp link; a file
    that appeared after the scan is not in it and stays."""
    store_dir = tmp_path / "store"
    install(observed(store_dir), V1, PEM1)
    stale = [f".myvault.web.{V2}.tmp-{TOKEN}", f".myvault.web.lnk-{TOKEN}"]
    (store_dir / stale[0]).write_bytes(b"half a cert")
    (store_dir / stale[1]).symlink_to(store_dir / f"myvault.web.{V1}")
    scan = fsio.Scan(str(store_dir))
    later = f".myvault.web.{V1}.tmp-{'a' * 16}"
    (store_dir / later).write_bytes(b"written after the scan")
    plan = store.plan(observed(store_dir), V2, PEM2)
    assert store.write_version(plan, scan=scan).wrote
    names = {p.name for p in store_dir.iterdir()}
    assert not names & set(stale)
    assert later in names and f"myvault.web.{V2}" in names
    assert store.older_versions(plan, scan) == [str(store_dir / f"myvault.web.{V1}")]


def test_a_pass_lists_each_store_once_however_many_it_installs(
    vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path  # noqa: F811 - the fixture
) -> None:
    """Installing 24 certificates reads the store directory once, not once per certificate (which
    made a first sync quadratic in the number of certificates), and removes a stale temp file."""
    names = [f"c{i:02}" for i in range(24)]
    for name in names:
        kv.add_certificate(name, make_chain(2, key_type="ec", key_size=256))
    store_dir = tmp_path / "store"
    store_dir.mkdir(mode=0o700)
    stale = store_dir / f".localhost.c07.{'0' * 32}.tmp-{TOKEN}"
    stale.write_bytes(b"left by a killed writer")
    with mock.patch("os.listdir", wraps=os.listdir) as listdir:
        results = sync.sync(settings(kv, store_dir, *names), vaults, NOW)
    assert {r.outcome for r in results} == {Outcome.INSTALLED}
    store_reads = [c for c in listdir.call_args_list if c.args and c.args[0] == str(store_dir)]
    assert len(store_reads) == 1
    assert not stale.exists()


def test_an_older_version_removed_after_the_scan_is_skipped(tmp_path: Path) -> None:
    """An old version pruned by someone else during a long pass does not fail the rotation."""
    store_dir = tmp_path / "store"
    install(observed(store_dir), V1, PEM1)
    scan = fsio.Scan(str(store_dir))
    (store_dir / f"myvault.web.{V1}").unlink()
    plan = store.plan(observed(store_dir), V2, PEM2)
    assert store.older_versions(plan, scan) == []


class _CanonicalVault:
    """A vault that, like Key Vault, answers a pinned version with its lower-case id."""

    def __init__(self, value: str) -> None:
        self.value, self.gets = value, 0

    def fetch(self, cert: ObservedCertificate) -> Secret:
        self.gets += 1
        version = str(cert.version).lower()
        return Secret(self.value, PEM, version, f"{cert.vault_url}/secrets/web/{version}")


def test_a_pinned_version_written_in_capitals_is_fetched_once(tmp_path: Path) -> None:
    """`…/secrets/web/ABCDEF…` installs `abcdef…` once; later passes do not GET it again."""
    vault = _CanonicalVault(secret_value(make_chain(2, key_type="ec", key_size=256), PEM))
    url = f"https://myvault.vault.azure.net/secrets/web/{'ABCDEF0123456789' * 2}"
    wanted = parse({"secretsManagementSettings": {
        "observedCertificates": [url], "certificateStoreLocation": str(tmp_path / "store")}})
    assert [r.outcome for r in sync.sync(wanted, vault, NOW)] == [Outcome.INSTALLED]
    assert [r.outcome for r in sync.sync(wanted, vault, NOW)] == [Outcome.UNCHANGED]
    assert vault.gets == 1


def test_a_new_store_is_made_durable_in_its_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating the store fsyncs its parent directory, then the store after the renames: after
    a power cut the served link cannot be lost with a store entry that never reached the disk."""
    synced: list[str] = []
    real = store.fsync_dir
    monkeypatch.setattr(store, "fsync_dir", lambda path: (synced.append(path), real(path)))
    install(observed(tmp_path / "store"), V1, PEM1)
    assert synced == [str(tmp_path), str(tmp_path / "store")]
