"""One sync pass on hostile ground: odd validity dates, broken stores, bad content and ACLs.

Each failure stays with its own certificate and never changes what is served.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from akvvm_ext import acl, sync
from akvvm_ext.keyvault import Secret, Vaults
from akvvm_ext.model import ObservedCertificate, Outcome
from tests.standins.certfactory import PKCS12, make_chain
from tests.standins.keyvault import KeyVaultStandin
from tests.test_store_paths import fill, read_only, small_tmpfs
from tests.test_sync import NOW, settings, snapshot, vaults

__all__ = ["vaults"]  # the fixture, shared with tests/test_sync.py
DAY = timedelta(days=1)


def served(store: Path, name: str) -> str:
    """The version file the link of secret `name` points at."""
    return os.readlink(store / f"localhost.{name}")


def test_expired_and_not_yet_valid_are_installed_with_a_warning(
    vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The vault decides: both are installed, and the result and the log say what is odd."""
    kv.add_certificate("old", make_chain(not_before=NOW - 30 * DAY, not_after=NOW - DAY))
    kv.add_certificate("early", make_chain(not_before=NOW + 10 * DAY, not_after=NOW + 400 * DAY))
    caplog.set_level(logging.WARNING, logger="akvvm.sync")
    wanted = settings(kv, tmp_path / "store", "old", "early")
    old, early = sync.sync(wanted, vaults, NOW)
    assert (old.outcome, early.outcome) == (Outcome.INSTALLED, Outcome.INSTALLED)
    assert old.path and early.path and served(tmp_path / "store", "old") == Path(old.path).name
    assert any("expired" in warning for warning in old.warnings)
    assert any("not valid before" in warning for warning in early.warnings)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(old.url in line and "expired" in line for line in logged)
    assert any(early.url in line and "not valid before" in line for line in logged)
    again = sync.sync(wanted, vaults, NOW)  # status keeps saying it on unchanged passes
    assert [(r.outcome, r.warnings) for r in again] == [
        (Outcome.UNCHANGED, old.warnings), (Outcome.UNCHANGED, early.warnings)]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A store per certificate: a good one, a file, one to make read-only, one on a tiny tmpfs."""
    (tmp_path / "a-file").write_bytes(b"not a directory")
    with small_tmpfs(tmp_path / "small") as small:
        yield {"good": tmp_path / "good", "filed": tmp_path / "a-file", "ro": tmp_path / "ro",
               "full": small / "store"}


def test_broken_stores_fail_alone_and_keep_serving(
    vaults: Vaults, kv: KeyVaultStandin, stores: dict[str, Path]
) -> None:
    """A store that is a file, read-only or full fails alone, keeps serving, and recovers."""
    entries: list[Any] = [{"name": name, "certificateStoreLocation": str(where)}
                          for name, where in stores.items()]
    wanted = settings(kv, stores["good"], *entries)
    first = {name: kv.add_certificate(name, make_chain(key_type="ec")) for name in stores}
    outcomes = [r.outcome for r in sync.sync(wanted, vaults, NOW)]
    assert outcomes == [Outcome.INSTALLED, Outcome.FAILED, Outcome.INSTALLED, Outcome.INSTALLED]
    before = {name: snapshot(stores[name]) for name in ("ro", "full")}
    second = {name: kv.add_certificate(name, make_chain(key_type="ec")) for name in stores}
    filler = fill(stores["full"].parent)
    with read_only(stores["ro"]):
        good, filed, ro, full = sync.sync(wanted, vaults, NOW)
        assert snapshot(stores["ro"]) == before["ro"]
    assert (good.outcome, good.version) == (Outcome.INSTALLED, second["good"])
    assert (filed.outcome, filed.error_kind, filed.version) == (Outcome.FAILED, "STORE", None)
    assert "not a directory" in (filed.error or "")
    for result, reason in ((ro, ("Read-only", "chattr")), (full, ("No space left",))):
        assert (result.outcome, result.error_kind) == (Outcome.FAILED, "STORE")
        assert any(word in (result.error or "") for word in reason), result.error
        assert result.version == first[result.url.rsplit("/", 1)[-1]]
    assert snapshot(stores["full"]) == before["full"]  # no half-written file, no temp left
    filler.unlink()
    again = sync.sync(wanted, vaults, NOW)
    assert [(r.outcome, r.version) for r in again if r.version] == [
        (Outcome.UNCHANGED, second["good"]), (Outcome.INSTALLED, second["ro"]),
        (Outcome.INSTALLED, second["full"])]


def readable_by_nobody(path: str) -> bool:
    """Whether user nobody (no supplementary groups) can open and read `path`."""
    done = subprocess.run(["head", "-c1", path], user="nobody", group="nogroup", extra_groups=[],
                          capture_output=True, check=False)
    return done.returncode == 0 and len(done.stdout) == 1


def test_link_never_serves_a_file_the_listed_user_cannot_read(
    vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At every rename that makes a file served (new version file, link flip) nobody can read it."""
    checked: list[tuple[str, bool]] = []
    real_rename = os.rename

    def watched_rename(src: str, dst: str) -> None:
        name = os.path.basename(src)
        if ".lnk-" in name:  # the link flip: check what it is about to serve
            target = os.path.join(os.path.dirname(src), os.readlink(src))
            checked.append((name, readable_by_nobody(target)))
        elif ".tmp-" in name:  # a version file about to take its name
            checked.append((name, readable_by_nobody(src)))
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", watched_rename)
    store, recorded = tmp_path / "store", list[acl.TraversalGrant]()
    wanted = settings(kv, store, {"name": "web", "acls": [{"user": "nobody"}]})
    try:
        kv.add_certificate("web", make_chain(key_type="ec"))
        sync.sync(wanted, vaults, NOW, record_grants=recorded.extend)
        new = kv.add_certificate("web", make_chain(key_type="ec"))
        [rotated] = sync.sync(wanted, vaults, NOW, record_grants=recorded.extend)
        (store / f"localhost.web.{new}").write_bytes(b"from an older extension")
        [corrected] = sync.sync(wanted, vaults, NOW, record_grants=recorded.extend)
        assert readable_by_nobody(str(store / "localhost.web"))
    finally:
        acl.revert(recorded)
    assert (rotated.outcome, corrected.outcome) == (Outcome.INSTALLED, Outcome.INSTALLED)
    assert [name.split(".")[-1][:4] for name, _ in checked] == ["tmp-", "lnk-"] * 2 + ["tmp-"]
    assert all(readable for _, readable in checked), checked


@pytest.mark.parametrize("failure", ["unknown user", "no ACL tool"])
def test_acl_failure_keeps_the_link_and_fails_alone(
    vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    failure: str
) -> None:
    """An ACL that cannot be set fails that certificate only; its link stays where it was."""
    store = tmp_path / "store"
    old = kv.add_certificate("web", make_chain(key_type="ec"))
    kv.add_certificate("api", make_chain(key_type="ec"))
    sync.sync(settings(kv, store, "web", "api"), vaults, NOW)
    new, api_new = (kv.add_certificate(n, make_chain(key_type="ec")) for n in ("web", "api"))
    user = "no-such-user-akvvm" if failure == "unknown user" else "nobody"
    if failure == "no ACL tool":
        monkeypatch.setattr(acl, "use_tools", True)
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    wanted = settings(kv, store, {"name": "web", "acls": [{"user": user}]}, "api")
    web, api = sync.sync(wanted, vaults, NOW)
    assert (web.outcome, web.error_kind, web.version) == (Outcome.FAILED, "ACL", old)
    assert new in (web.error or "") and (failure != "unknown user" or user in (web.error or ""))
    assert served(store, "web") == f"localhost.web.{old}"
    assert not [p.name for p in store.iterdir() if p.name.startswith(".") or new in p.name]
    assert (api.outcome, api.version) == (Outcome.INSTALLED, api_new)


def test_bad_content_keeps_serving_previous_version(vaults: Vaults, kv: KeyVaultStandin,
                                                    tmp_path: Path) -> None:
    """A new version that is not a certificate changes nothing; the result says what is served."""
    good = kv.add_certificate("web", make_chain())
    store = tmp_path / "store"
    wanted = settings(kv, store, "web")
    sync.sync(wanted, vaults, NOW)
    before = snapshot(store)
    bad = kv.set_secret("web", "bm90IGEgcGZ4", content_type=PKCS12)
    [result] = sync.sync(wanted, vaults, NOW)
    assert (result.outcome, result.error_kind) == (Outcome.FAILED, "CONTENT")
    assert (result.version, result.path) == (good, str(store / f"localhost.web.{good}"))
    assert result.not_after is not None and bad in (result.error or "")
    assert snapshot(store) == before


class Exploding:
    """A fetcher that fails unexpectedly for one secret and delegates the rest."""

    def __init__(self, inner: Vaults, bad: str) -> None:
        self.inner, self.bad = inner, bad

    def fetch(self, cert: ObservedCertificate) -> Secret:
        if cert.secret_name == self.bad:
            raise RuntimeError("bug")
        return self.inner.fetch(cert)


def test_unexpected_error_is_contained(vaults: Vaults, kv: KeyVaultStandin,
                                       tmp_path: Path) -> None:
    """A bug while handling one certificate is an INTERNAL failure for it alone."""
    kv.add_certificate("good", make_chain())
    results = sync.sync(settings(kv, tmp_path / "s", "bad", "good"), Exploding(vaults, "bad"), NOW)
    assert [(r.outcome, r.error_kind) for r in results] == [
        (Outcome.FAILED, "INTERNAL"), (Outcome.INSTALLED, None)]
