"""The Key Vault stand-in as the real SDK sees it: SecretClient + ManagedIdentityCredential."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceResponseError,
)
from azure.identity import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.standins.certfactory import PEM, PKCS12, Chain
from tests.standins.imds import ImdsStandin
from tests.standins.keyvault import KeyVaultStandin


def _client(kv: KeyVaultStandin, credential: Any = None, retries: int = 2) -> SecretClient:
    return SecretClient(kv.url, credential or ManagedIdentityCredential(),
                        verify_challenge_resource=False, retry_total=retries,
                        retry_backoff_factor=0.01)


@pytest.fixture
def client(azure_env: dict[str, str], kv: KeyVaultStandin) -> SecretClient:
    return _client(kv)


def _token(imds: ImdsStandin) -> dict[str, str]:
    reply = requests.get(imds.url + "/metadata/identity/oauth2/token", headers={"Metadata": "true"},
                         params={"api-version": "2018-02-01", "resource": "https://vault.azure.net"})
    return {"Authorization": "Bearer " + reply.json()["access_token"]}


def test_latest_certificate_arrives_through_the_challenge_flow(
        client: SecretClient, kv: KeyVaultStandin, chain: Callable[..., Chain]) -> None:
    """The SDK's first call gets the 401 challenge, then fetches the latest version with a token."""
    leaf_chain = chain()
    version = kv.add_certificate("web", leaf_chain)
    secret = client.get_secret("web")
    assert kv.requests == [("GET", "/secrets/web/", 401), ("GET", "/secrets/web/", 200)]
    assert secret.properties.version == version and secret.properties.managed
    assert secret.properties.content_type == PKCS12
    assert secret.properties.key_id == f"{kv.url}/keys/web/{version}"
    loaded = pkcs12.load_pkcs12(base64.b64decode(secret.value or ""), b"")
    assert loaded.cert is not None and loaded.cert.certificate == leaf_chain.leaf


def test_pinned_version_still_served_after_rotation(
        client: SecretClient, kv: KeyVaultStandin, chain: Callable[..., Chain]) -> None:
    """A pinned version returns that version even when a newer one exists."""
    old = kv.add_certificate("web", chain(), content_type=PEM)
    new = kv.add_certificate("web", chain())
    assert client.get_secret("web", old).properties.version == old
    assert client.get_secret("web", old).properties.content_type == PEM
    assert client.get_secret("web").properties.version == new


def test_versions_listed_across_pages(client: SecretClient, kv: KeyVaultStandin) -> None:
    """Five versions at two per page come back complete, in three authenticated requests."""
    made = {kv.set_secret("s", f"v{i}") for i in range(5)}
    listed = [p.version for p in client.list_properties_of_secret_versions("s", max_page_size=2)]
    assert set(listed) == made and len(listed) == 5
    assert kv.count("s", status=200) == 3


def test_next_link_is_absolute_and_keeps_page_size(kv: KeyVaultStandin, imds: ImdsStandin) -> None:
    """The raw list page carries an absolute nextLink on the vault's own origin."""
    for i in range(3):
        kv.set_secret(f"s{i}", "x")
    page = requests.get(kv.url + "/secrets", params={"api-version": "7.4", "maxresults": "2"},
                        headers=_token(imds), verify=kv.ca_path).json()
    assert [i["id"] for i in page["value"]] == [kv.secret_id("s0"), kv.secret_id("s1")]
    assert page["nextLink"].startswith(kv.url + "/secrets?api-version=7.4&%24skiptoken=")
    rest = requests.get(page["nextLink"], headers=_token(imds), verify=kv.ca_path).json()
    assert [i["id"] for i in rest["value"]] == [kv.secret_id("s2")] and rest["nextLink"] is None


def test_secret_list_pages_by_25(client: SecretClient, kv: KeyVaultStandin,
                                 chain: Callable[..., Chain]) -> None:
    """Thirty secrets list in two pages of the default size, certificate items marked managed."""
    kv.add_certificate("cert", chain(depth=2, key_type="ec"))
    for i in range(29):
        kv.set_secret(f"plain{i:02}", "x")
    items = list(client.list_properties_of_secrets())
    assert len(items) == 30 and kv.count(status=200) == 2
    cert = next(i for i in items if i.name == "cert")
    assert cert.managed and cert.content_type == PKCS12 and cert.version is None


def test_missing_secret_is_resource_not_found(client: SecretClient) -> None:
    """An unknown name is a 404 SecretNotFound, as Key Vault reports it."""
    with pytest.raises(ResourceNotFoundError) as caught:
        client.get_secret("nope")
    assert caught.value.error is not None and caught.value.error.code == "SecretNotFound"
    assert "(name/id) nope was not found" in str(caught.value.message)


def test_forbidden_then_allowed(client: SecretClient, kv: KeyVaultStandin) -> None:
    """A scripted RBAC denial surfaces as 403 Forbidden/ForbiddenByRbac, then access resumes."""
    kv.set_secret("s", "x")
    kv.fault("s", "forbidden", times=1)
    with pytest.raises(HttpResponseError) as caught:
        client.get_secret("s")
    error = caught.value.error
    assert caught.value.status_code == 403 and error is not None and error.code == "Forbidden"
    assert error.innererror == {"code": "ForbiddenByRbac"}
    assert client.get_secret("s").value == "x"


@pytest.mark.parametrize("retry_after", [0, None])
def test_throttle_is_retried_by_the_sdk(client: SecretClient, kv: KeyVaultStandin,
                                        retry_after: int | None) -> None:
    """A 429, with or without Retry-After, is absorbed by the SDK's own retry policy."""
    kv.set_secret("s", "x")
    kv.fault("s", "throttle", times=1, retry_after=retry_after)
    assert client.get_secret("s").value == "x"
    assert kv.count("s", status=429) == 1


def test_throttle_beyond_retries_is_an_error(client: SecretClient, kv: KeyVaultStandin) -> None:
    """More 429s than the SDK retries end as HttpResponseError 429 Throttled."""
    kv.set_secret("s", "x")
    kv.fault("s", "throttle", times=5, retry_after=0)
    with pytest.raises(HttpResponseError) as caught:
        client.get_secret("s")
    assert caught.value.status_code == 429
    assert caught.value.error is not None and caught.value.error.code == "Throttled"


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors(client: SecretClient, kv: KeyVaultStandin, status: int) -> None:
    """5xx within the retry budget is absorbed; beyond it the status reaches the caller."""
    kv.set_secret("s", "x")
    kv.fault("s", "server_error", times=1, status=status)
    assert client.get_secret("s").value == "x"
    kv.fault("s", "server_error", times=3, status=status)
    with pytest.raises(HttpResponseError) as caught:
        client.get_secret("s")
    assert caught.value.status_code == status


def test_reset_is_a_transport_error(azure_env: dict[str, str], kv: KeyVaultStandin) -> None:
    """A connection reset mid-request reaches the caller as azure-core's ServiceResponseError."""
    kv.set_secret("s", "x")
    client = _client(kv, retries=0)
    client.get_secret("s")
    kv.fault("s", "reset")
    with pytest.raises(ServiceResponseError):
        client.get_secret("s")
    assert ("GET", "/secrets/s/", 0) in kv.requests
    assert client.get_secret("s").value == "x"


def test_malformed_body_is_a_decode_error(client: SecretClient, kv: KeyVaultStandin) -> None:
    """A 200 with broken JSON is a DecodeError, not a secret."""
    kv.set_secret("s", "x")
    kv.fault(None, "malformed")
    with pytest.raises(DecodeError):
        client.get_secret("s")


def test_delay_and_latency_slow_answers(client: SecretClient, kv: KeyVaultStandin) -> None:
    """A scripted delay and the global latency both hold the answer back."""
    kv.set_secret("s", "x")
    client.get_secret("s")
    kv.fault("s", "delay", seconds=0.3)
    started = time.monotonic()
    client.get_secret("s")
    assert time.monotonic() - started >= 0.3
    kv.latency = 0.1
    started = time.monotonic()
    client.get_secret("s")
    assert 0.1 <= time.monotonic() - started < 0.3


def test_disabled_and_deleted(client: SecretClient, kv: KeyVaultStandin) -> None:
    """A disabled version is 403 SecretDisabled; a deleted secret is 404."""
    kv.set_secret("s", "x")
    kv.disable_version("s")
    with pytest.raises(HttpResponseError) as caught:
        client.get_secret("s")
    assert caught.value.status_code == 403
    assert caught.value.error is not None and caught.value.error.innererror == {
        "code": "SecretDisabled"}
    kv.delete("s")
    with pytest.raises(ResourceNotFoundError):
        client.get_secret("s")


class _ForgedCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("forged", int(time.time()) + 3600)


def test_token_not_issued_by_imds_is_refused(azure_env: dict[str, str],
                                             kv: KeyVaultStandin) -> None:
    """A bearer token the IMDS stand-in never issued gets 401, ClientAuthenticationError."""
    kv.set_secret("s", "x")
    with pytest.raises(ClientAuthenticationError) as caught:
        _client(kv, credential=_ForgedCredential()).get_secret("s")
    assert caught.value.status_code == 401


def test_pem_conversion_on_request(client: SecretClient, kv: KeyVaultStandin,
                                   chain: Callable[..., Chain]) -> None:
    """outContentType turns a PFX-backed certificate into Key Vault's PEM, key first."""
    kv.add_certificate("web", chain())
    secret = client.get_secret("web", out_content_type=PEM)
    assert secret.properties.content_type == PEM
    assert (secret.value or "").startswith("-----BEGIN PRIVATE KEY-----\n")


def test_names_are_case_insensitive_and_any_api_version(kv: KeyVaultStandin,
                                                        imds: ImdsStandin) -> None:
    """Key Vault matches names case-insensitively and accepts any api-version."""
    kv.set_secret("MySecret", "x")
    reply = requests.get(kv.url + "/secrets/mysecret", params={"api-version": "2016-10-01"},
                         headers=_token(imds), verify=kv.ca_path)
    assert reply.status_code == 200 and reply.json()["id"].startswith(kv.url + "/secrets/MySecret/")


def test_counters_count_and_reset(client: SecretClient, kv: KeyVaultStandin) -> None:
    """count() filters by secret, method and status; reset_counters() starts over."""
    kv.set_secret("a", "x")
    kv.set_secret("b", "x")
    client.get_secret("a")
    client.get_secret("b")
    client.get_secret("b")
    assert (kv.count("a"), kv.count("b"), kv.count(status=401)) == (2, 2, 1)
    kv.reset_counters()
    assert kv.count() == 0
