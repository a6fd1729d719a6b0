"""One sync pass against the stand-ins: real SecretClient, real IMDS flow, real files."""
from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from akvvm_ext import acl, identity, sync
from akvvm_ext.keyvault import Vaults
from akvvm_ext.listing import ChangeDetector
from akvvm_ext.model import CertResult, Identity, Outcome, Settings
from akvvm_ext.settings import parse
from tests.standins.certfactory import PEM, PKCS12, make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def vaults(azure_env: dict[str, str], imds: ImdsStandin, kv: KeyVaultStandin) -> Iterator[Vaults]:
    cred = identity.credential(Identity(imds.url + "/metadata/identity"))
    made = Vaults(cred, connection_verify=kv.ca_path)
    yield made
    made.close()


def settings(kv: KeyVaultStandin, store: Path, *certs: str | dict[str, Any],
             **sms: Any) -> Settings:
    """Parsed settings observing `certs` (secret names, or entry dicts with a `name`)."""
    entries: list[Any] = []
    for cert in certs:
        if isinstance(cert, str):
            entries.append(kv.secret_id(cert))
        else:
            entry = dict(cert)
            entry["url"] = kv.secret_id(entry.pop("name"), entry.pop("version", None))
            entries.append(entry)
    sms = {"observedCertificates": entries, "certificateStoreLocation": str(store),
           "additionalVaultDnsSuffixes": ["localhost"], **sms}
    return parse({"secretsManagementSettings": sms})


def certs_in(path: str | Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def snapshot(store: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry of the store: inode, mtime and link target (empty for files)."""
    out = {}
    for entry in sorted(store.iterdir()):
        st = entry.lstat()
        target = os.readlink(entry) if entry.is_symlink() else ""
        out[entry.name] = (st.st_ino, st.st_mtime_ns, target)
    return out


def test_installs_full_chain_behind_link(vaults: Vaults, kv: KeyVaultStandin,
                                         tmp_path: Path) -> None:
    """A new certificate becomes <vault>.<name>.<version> (0600, leaf first, key last) + link."""
    chain = make_chain()
    version = kv.add_certificate("web", chain)
    store = tmp_path / "store"
    [result] = sync.sync(settings(kv, store, "web"), vaults, NOW)
    assert result.outcome is Outcome.INSTALLED
    assert result.version == version
    assert result.path == str(store / f"localhost.web.{version}")
    assert result.link == str(store / "localhost.web")
    assert os.readlink(store / "localhost.web") == f"localhost.web.{version}"
    assert certs_in(result.link) == list(chain.certs)
    assert (store / "localhost.web").read_bytes().endswith(chain.key_pem())
    assert os.stat(result.path).st_mode & 0o777 == 0o600
    assert result.not_after == chain.leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_steady_pass_is_one_get_no_token_no_write(
    vaults: Vaults, kv: KeyVaultStandin, imds: ImdsStandin, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing changed: one GET per certificate, no token request, no conversion, no write."""
    for name in ("a", "b", "c"):
        kv.add_certificate(name, make_chain(), content_type=PEM if name == "b" else PKCS12)
    store = tmp_path / "store"
    wanted = settings(kv, store, "a", "b", "c")
    assert {r.outcome for r in sync.sync(wanted, vaults, NOW)} == {Outcome.INSTALLED}
    before, tokens = snapshot(store), imds.token_requests
    kv.reset_counters()
    monkeypatch.setattr("akvvm_ext.chain.convert", lambda *a: pytest.fail("converted again"))
    results = sync.sync(wanted, vaults, NOW)
    assert [r.outcome for r in results] == [Outcome.UNCHANGED] * 3
    assert all(r.not_after and r.path for r in results)
    assert kv.count() == 3 and imds.token_requests == tokens
    assert snapshot(store) == before


def test_rotation_moves_link_and_keeps_old_version(vaults: Vaults, kv: KeyVaultStandin,
                                                   tmp_path: Path) -> None:
    """A new version in the vault is installed beside the old one and the link moves to it."""
    old = kv.add_certificate("web", make_chain())
    store = tmp_path / "store"
    wanted = settings(kv, store, "web")
    sync.sync(wanted, vaults, NOW)
    new = kv.add_certificate("web", make_chain())
    [result] = sync.sync(wanted, vaults, NOW)
    assert (result.outcome, result.version) == (Outcome.INSTALLED, new)
    assert os.readlink(store / "localhost.web") == f"localhost.web.{new}"
    assert (store / f"localhost.web.{old}").is_file()


def test_pinned_version_needs_no_get_once_installed(vaults: Vaults, kv: KeyVaultStandin,
                                                    tmp_path: Path) -> None:
    """A pinned version is installed even when newer exist, then never fetched again."""
    pinned = kv.add_certificate("web", make_chain())
    kv.add_certificate("web", make_chain())
    wanted = settings(kv, tmp_path / "store", {"name": "web", "version": pinned})
    [first] = sync.sync(wanted, vaults, NOW)
    assert (first.outcome, first.version) == (Outcome.INSTALLED, pinned)
    kv.reset_counters()
    [second] = sync.sync(wanted, vaults, NOW)
    assert (second.outcome, second.version) == (Outcome.UNCHANGED, pinned)
    assert kv.count() == 0


def test_forbidden_then_installs_on_next_pass(vaults: Vaults, kv: KeyVaultStandin,
                                              tmp_path: Path) -> None:
    """RBAC not yet propagated: the result names 403 and the role; the next pass installs."""
    version = kv.add_certificate("web", make_chain())
    kv.fault("web", "forbidden")
    wanted = settings(kv, tmp_path / "store", "web")
    [failed] = sync.sync(wanted, vaults, NOW)
    assert (failed.outcome, failed.error_kind, failed.retryable) == (Outcome.FAILED, "FETCH", True)
    assert "403" in (failed.error or "") and "Key Vault Secrets User" in (failed.error or "")
    assert failed.version is None and not (tmp_path / "store" / "localhost.web").exists()
    [done] = sync.sync(wanted, vaults, NOW)
    assert (done.outcome, done.version) == (Outcome.INSTALLED, version)


def test_throttled_result_carries_retry_after(vaults: Vaults, kv: KeyVaultStandin,
                                              tmp_path: Path) -> None:
    """429 with Retry-After reaches the result so the service can wait that long."""
    kv.add_certificate("web", make_chain())
    kv.fault("web", "throttle", retry_after=30)
    [result] = sync.sync(settings(kv, tmp_path / "store", "web"), vaults, NOW)
    assert (result.outcome, result.retryable, result.retry_after) == (Outcome.FAILED, True, 30.0)


def test_one_failure_does_not_affect_the_others(vaults: Vaults, kv: KeyVaultStandin,
                                                tmp_path: Path) -> None:
    """A 5xx, a missing secret and garbage content fail alone; the good certificate installs."""
    for name in ("flaky", "good"):
        kv.add_certificate(name, make_chain())
    kv.set_secret("junk", "not a certificate", content_type=PKCS12)
    kv.fault("flaky", "server_error", status=503)
    results = sync.sync(settings(kv, tmp_path / "store", "flaky", "missing", "junk", "good"),
                        vaults, NOW)
    kinds = [(r.outcome, r.error_kind) for r in results]
    assert kinds == [(Outcome.FAILED, "FETCH"), (Outcome.FAILED, "FETCH"),
                     (Outcome.FAILED, "CONTENT"), (Outcome.INSTALLED, None)]


def test_identical_urls_share_one_get(vaults: Vaults, kv: KeyVaultStandin,
                                      tmp_path: Path) -> None:
    """The same URL observed into two stores costs one GET and installs in both."""
    version = kv.add_certificate("web", make_chain())
    wanted = settings(kv, tmp_path / "a", "web",
                      {"name": "web", "certificateStoreLocation": str(tmp_path / "b")})
    results = sync.sync(wanted, vaults, NOW)
    assert [(r.outcome, r.version) for r in results] == [(Outcome.INSTALLED, version)] * 2
    assert {Path(r.path).parent for r in results if r.path} == {tmp_path / "a", tmp_path / "b"}
    assert kv.count("web", status=200) == 1


def test_file_from_older_extension_is_corrected(vaults: Vaults, kv: KeyVaultStandin,
                                                tmp_path: Path) -> None:
    """An installed version file without the chain is replaced by the full chain once."""
    chain = make_chain()
    version = kv.add_certificate("web", chain)
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    (store / f"localhost.web.{version}").write_bytes(chain.cert_pems()[0] + chain.key_pem())
    os.symlink(f"localhost.web.{version}", store / "localhost.web")
    [result] = sync.sync(settings(kv, store, "web"), vaults, NOW)
    assert result.outcome is Outcome.INSTALLED
    assert certs_in(store / "localhost.web") == list(chain.certs)


def getfacl(path: str | Path) -> str:
    return subprocess.run(["getfacl", "-c", "-p", str(path)], capture_output=True, text=True,
                          check=True).stdout


def test_acls_are_granted_and_recorded(vaults: Vaults, kv: KeyVaultStandin,
                                       tmp_path: Path) -> None:
    """acls give the user read on the version file; ancestor grants reach the recorder."""
    kv.add_certificate("web", make_chain())
    recorded: list[acl.TraversalGrant] = []
    wanted = settings(kv, tmp_path / "store", {"name": "web", "acls": [{"user": "nobody"}]})
    try:
        [result] = sync.sync(wanted, vaults, NOW, record_grants=recorded.extend)
        assert result.outcome is Outcome.INSTALLED
        assert "user:nobody:r--" in getfacl(result.path or "")
        assert "user:nobody:--x" in getfacl(tmp_path / "store")
    finally:
        acl.revert(recorded)
    assert recorded  # pytest's 0700 tmp ancestors needed traversal


def test_acls_off_grants_nothing(vaults: Vaults, kv: KeyVaultStandin, tmp_path: Path) -> None:
    """aclEnabled false leaves the version file root-only even with acls listed."""
    kv.add_certificate("web", make_chain())
    wanted = settings(kv, tmp_path / "store", {"name": "web", "acls": [{"user": "nobody"}]},
                      aclEnabled=False)
    [result] = sync.sync(wanted, vaults, NOW)
    assert "nobody" not in getfacl(result.path or "")


def test_logs_carry_events_but_no_secret(vaults: Vaults, kv: KeyVaultStandin, imds: ImdsStandin,
                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Installs and failures are logged, one line each, without key, value or token."""
    chain = make_chain()
    kv.add_certificate("web", chain)
    kv.fault("api", "forbidden")
    caplog.set_level(logging.DEBUG)
    results: list[CertResult] = sync.sync(settings(kv, tmp_path / "s", "web", "api"), vaults, NOW)
    text = caplog.text
    assert "installed version" in text and "403" in text and len(results) == 2
    key_body = chain.key_pem().decode().splitlines()[1]
    value = kv.secret_id("web")  # the URL may appear; the value must not
    assert value in text and key_body not in text
    assert not any(t.token in text for t in imds.issued_tokens)


def test_listing_replaces_gets_when_cheaper(azure_env: dict[str, str], imds: ImdsStandin,
                                            tmp_path: Path) -> None:
    """With a ChangeDetector, settled certificates cost one listing page, and a rotation is
    still picked up."""
    clock = [time.time() - 3600]  # the secrets were created an hour ago
    with KeyVaultStandin(accept_token=imds.token_issued, clock=lambda: clock[0]) as kv:
        names = [f"c{i}" for i in range(6)]
        for name in names:
            kv.add_certificate(name, make_chain())
        vaults = Vaults(identity.credential(Identity(imds.url + "/metadata/identity")),
                        connection_verify=kv.ca_path)
        detector, wanted = ChangeDetector(), settings(kv, tmp_path / "s", *names)
        sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
        kv.reset_counters()
        steady = sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
        assert {r.outcome for r in steady} == {Outcome.UNCHANGED}
        assert kv.requests == [("GET", "/secrets", 200)]
        clock[0] = time.time()
        new = kv.add_certificate("c3", make_chain())
        kv.reset_counters()
        rotated = sync.sync(wanted, vaults, datetime.now(timezone.utc), detector=detector)
    assert [r.outcome for r in rotated].count(Outcome.INSTALLED) == 1
    assert rotated[3].version == new
    assert kv.count() == 2  # one listing page, one GET for the rotated certificate


def test_slow_certificate_does_not_hold_back_the_others(vaults: Vaults, kv: KeyVaultStandin,
                                                        tmp_path: Path) -> None:
    """While one vault answer hangs, the other certificates are installed."""
    for name in ("slow", "a", "b"):
        kv.add_certificate(name, make_chain())
    kv.fault("slow", "delay", seconds=4.0)
    store = tmp_path / "store"
    done: list[list[CertResult]] = []
    worker = threading.Thread(
        target=lambda: done.append(sync.sync(settings(kv, store, "slow", "a", "b"), vaults, NOW)))
    worker.start()
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not all(
            (store / f"localhost.{n}").exists() for n in ("a", "b")):
        time.sleep(0.05)
    assert worker.is_alive()  # "slow" is still waiting for its answer
    assert (store / "localhost.a").exists() and (store / "localhost.b").exists()
    worker.join(10)
    assert [r.outcome for r in done[0]] == [Outcome.INSTALLED] * 3
