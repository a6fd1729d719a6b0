"""Key Vault access against the stand-ins: real SecretClient, real ManagedIdentityCredential."""
from __future__ import annotations

import dataclasses
import select
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from akvvm_ext import identity
from akvvm_ext.errors import FetchError
from akvvm_ext.keyvault import Vaults
from akvvm_ext.model import Identity, ObservedCertificate
from akvvm_ext.settings import parse
from tests.standins.certfactory import PEM, make_chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin


def observed(kv: KeyVaultStandin, name: str, version: str | None = None,
             suffixes: tuple[str, ...] = ("localhost",)) -> ObservedCertificate:
    """The ObservedCertificate the settings parser makes for `name` in the stand-in vault."""
    url = kv.secret_id(name, version)
    sms = {"observedCertificates": [url], "certificateStoreLocation": "/nonexistent/store",
           "additionalVaultDnsSuffixes": list(suffixes)}
    return parse({"secretsManagementSettings": sms}).observed[0]


def make_vaults(imds: ImdsStandin, kv: KeyVaultStandin | None = None, client_id: str | None = None,
                **options: Any) -> Vaults:
    """Vaults on a credential pointed at the IMDS stand-in; trusts `kv`'s CA when given."""
    cred = identity.credential(Identity(imds.url + "/metadata/identity", client_id),
                               backoff_scale=0.01)
    return Vaults(cred, **({"connection_verify": kv.ca_path} if kv else {}), **options)


@pytest.fixture
def vaults(azure_env: dict[str, str], imds: ImdsStandin, kv: KeyVaultStandin) -> Iterator[Vaults]:
    made = make_vaults(imds, kv)
    yield made
    made.close()


def fetch_error(vaults: Vaults, cert: ObservedCertificate) -> FetchError:
    with pytest.raises(FetchError) as caught:
        vaults.fetch(cert)
    return caught.value


def test_fetches_latest_version(vaults: Vaults, kv: KeyVaultStandin, imds: ImdsStandin) -> None:
    """The unversioned URL gives the newest version, with its content type and attributes."""
    kv.add_certificate("web", make_chain())
    newest = kv.add_certificate("web", make_chain(), content_type=PEM)
    secret = vaults.fetch(observed(kv, "web"))
    assert (secret.version, secret.content_type, secret.managed) == (newest, PEM, True)
    assert "-----BEGIN" in secret.value and secret.enabled is True
    assert imds.token_requests == 1


def test_fetches_pinned_version(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """A versioned URL gives exactly that version even when a newer one exists."""
    first = kv.add_certificate("web", make_chain())
    kv.add_certificate("web", make_chain())
    assert vaults.fetch(observed(kv, "web", first)).version == first


def test_secret_value_is_not_in_repr(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """A Secret can be logged by accident without leaking its value."""
    kv.set_secret("plain", "hunter2-value")
    secret = vaults.fetch(observed(kv, "plain"))
    assert secret.value == "hunter2-value" and "hunter2" not in repr(secret)
    assert secret.content_type is None and secret.managed is False


def test_steady_fetches_reuse_client_and_token(vaults: Vaults, kv: KeyVaultStandin,
                                               imds: ImdsStandin) -> None:
    """After the first challenge, each fetch is one GET and needs no token request."""
    kv.add_certificate("a", make_chain())
    kv.add_certificate("b", make_chain())
    for _ in range(3):
        vaults.fetch(observed(kv, "a"))
        vaults.fetch(observed(kv, "b"))
    assert kv.count(status=401) == 1
    assert kv.count(status=200) == 6
    assert imds.token_requests == 1


def test_parallel_first_fetches_send_one_challenge(vaults: Vaults, kv: KeyVaultStandin,
                                                   imds: ImdsStandin) -> None:
    """Eight workers starting at once cause one 401 challenge and one token request."""
    names = [f"c{i}" for i in range(8)]
    for name in names:
        kv.add_certificate(name, make_chain())
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: vaults.fetch(observed(kv, n)), names))
    assert kv.count(status=401) == 1
    assert imds.token_requests == 1


def test_forbidden_names_the_role_then_recovers(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """403 ForbiddenByRbac says which role is missing on which vault; it is retryable."""
    version = kv.add_certificate("web", make_chain())
    kv.fault("web", "forbidden", times=2)
    for _ in range(2):
        err = fetch_error(vaults, observed(kv, "web"))
        assert err.status == 403 and err.retryable
        assert "ForbiddenByRbac" in str(err)
        assert "'Key Vault Secrets User' role on vault localhost" in str(err)
    assert vaults.fetch(observed(kv, "web")).version == version


@pytest.mark.parametrize(("retry_after", "expected"), [(7, 7.0), (None, None)])
def test_throttling_is_retryable_with_server_delay(
    vaults: Vaults, kv: KeyVaultStandin, retry_after: int | None, expected: float | None
) -> None:
    """429 is retryable and carries Retry-After when sent; the SDK does not sleep on it."""
    kv.add_certificate("web", make_chain())
    vaults.fetch(observed(kv, "web"))
    kv.fault("web", "throttle", retry_after=retry_after)
    err = fetch_error(vaults, observed(kv, "web"))
    assert (err.status, err.retryable, err.retry_after) == (429, True, expected)
    assert kv.count("web", status=429) == 1


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_are_retryable_without_sdk_retry(vaults: Vaults, kv: KeyVaultStandin,
                                                       status: int) -> None:
    """5xx is retryable by the service; the SDK itself sends it only once."""
    kv.add_certificate("web", make_chain())
    kv.fault("web", "server_error", status=status)
    err = fetch_error(vaults, observed(kv, "web"))
    assert (err.status, err.retryable) == (status, True)
    assert kv.count("web", status=status) == 1


def test_reset_is_retried_once_by_sdk(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """One reset connection is retried at once (stale keep-alive); two make a retryable error."""
    version = kv.add_certificate("web", make_chain())
    kv.fault("web", "reset", times=1)
    assert vaults.fetch(observed(kv, "web")).version == version
    kv.fault("web", "reset", times=2)
    err = fetch_error(vaults, observed(kv, "web"))
    assert err.retryable and err.status == 0 and "cannot reach vault localhost" in str(err)


def test_timeout_is_retryable(azure_env: dict[str, str], imds: ImdsStandin,
                              kv: KeyVaultStandin) -> None:
    """A vault slower than the read timeout gives a retryable error instead of hanging."""
    kv.add_certificate("web", make_chain())
    vaults = make_vaults(imds, kv, read_timeout=0.3, retry_total=0)
    vaults.fetch(observed(kv, "web"))
    kv.fault("web", "delay", seconds=1.0)
    assert fetch_error(vaults, observed(kv, "web")).retryable


def test_malformed_response_is_retryable_and_not_echoed(vaults: Vaults,
                                                        kv: KeyVaultStandin) -> None:
    """A truncated JSON body is a retryable error whose message does not quote the body."""
    kv.add_certificate("web", make_chain())
    kv.fault("web", "malformed")
    err = fetch_error(vaults, observed(kv, "web"))
    assert err.retryable and "MIIK" not in str(err)


def test_not_found_says_whether_name_or_version(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """404 for a missing secret names the secret; for a missing version, the version."""
    kv.add_certificate("web", make_chain())
    missing = fetch_error(vaults, observed(kv, "nosuch"))
    assert missing.status == 404
    assert "Secret nosuch does not exist in vault localhost" in str(missing)
    pinned = fetch_error(vaults, observed(kv, "web", "0" * 32))
    assert f"Version {'0' * 32} of secret web does not exist" in str(pinned)


def test_disabled_version_gets_its_own_hint(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """A disabled secret version is not blamed on RBAC."""
    kv.add_certificate("web", make_chain())
    kv.disable_version("web")
    err = fetch_error(vaults, observed(kv, "web"))
    assert err.status == 403 and "disabled" in str(err) and "role" not in str(err)


def test_challenge_check_stays_on_for_azure_hosts(vaults: Vaults, kv: KeyVaultStandin) -> None:
    """Without additionalVaultDnsSuffixes relaxation a foreign challenge resource is refused."""
    kv.add_certificate("web", make_chain())
    strict = dataclasses.replace(observed(kv, "web"), relaxed_challenge=False)
    err = fetch_error(vaults, strict)
    assert not err.retryable and "challenge for another resource (vault.azure.net)" in str(err)
    assert vaults.fetch(observed(kv, "web")).managed  # the relaxed twin works


def test_rejected_token_points_at_identity(azure_env: dict[str, str], imds: ImdsStandin) -> None:
    """401 after the challenge (a token the vault refuses) is an identity problem."""
    with KeyVaultStandin(accept_token=lambda token: False) as picky:
        picky.add_certificate("web", make_chain())
        vaults = make_vaults(imds, picky)
        err = fetch_error(vaults, observed(picky, "web"))
    assert err.status == 401 and err.retryable and "msiClientId" in str(err)


def test_no_token_in_any_error(vaults: Vaults, kv: KeyVaultStandin, imds: ImdsStandin) -> None:
    """Error texts never carry a bearer token."""
    kv.add_certificate("web", make_chain())
    errors = []
    for kind in ("forbidden", "throttle", "server_error", "malformed"):
        kv.fault("web", kind)
        errors.append(str(fetch_error(vaults, observed(kv, "web"))))
    errors.append(str(fetch_error(vaults, observed(kv, "nosuch"))))
    tokens = [t.token for t in imds.issued_tokens]
    assert tokens and not any(t in e or "eyJ" in e for t in tokens for e in errors)


def test_requests_ca_bundle_is_honoured(azure_env: dict[str, str], imds: ImdsStandin,
                                        kv: KeyVaultStandin,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit CA, REQUESTS_CA_BUNDLE decides whether the vault is trusted."""
    version = kv.add_certificate("web", make_chain())
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", kv.ca_path)
    assert make_vaults(imds).fetch(observed(kv, "web")).version == version
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    err = fetch_error(make_vaults(imds), observed(kv, "web"))
    assert err.retryable and "REQUESTS_CA_BUNDLE" in str(err)


class ConnectProxy:
    """A minimal HTTPS (CONNECT) proxy on loopback that records the tunnels it opened."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        target = head.split()[1].decode()
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        pipes = {client: upstream, upstream: client}
        while True:
            ready, _, _ = select.select(list(pipes), [], [], 5)
            data = ready[0].recv(65536) if ready else b""
            if not data:
                break
            pipes[ready[0]].sendall(data)
        client.close()
        upstream.close()

    def close(self) -> None:
        self._server.close()


def test_https_proxy_for_vault_never_for_imds(azure_env: dict[str, str], imds: ImdsStandin,
                                              kv: KeyVaultStandin,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Key Vault traffic goes through HTTPS_PROXY; IMDS bypasses a (dead) HTTP_PROXY."""
    proxy = ConnectProxy()
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    version = kv.add_certificate("web", make_chain())
    try:
        assert make_vaults(imds, kv).fetch(observed(kv, "web")).version == version
    finally:
        proxy.close()
    assert proxy.tunnels and all(t.startswith("localhost:") for t in proxy.tunnels)
    assert imds.token_requests == 1
