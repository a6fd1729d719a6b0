"""The managed-identity credential: endpoint forms, the environment it sets, real token flows."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from akvvm_ext import identity
from akvvm_ext.errors import FetchError
from akvvm_ext.keyvault import Vaults
from akvvm_ext.model import Identity, ObservedCertificate
from akvvm_ext.settings import parse
from tests.standins.certfactory import make_chain
from tests.standins.imds import SYSTEM_CLIENT_ID, ImdsStandin
from tests.standins.keyvault import KeyVaultStandin

KV_SCOPE = "https://vault.azure.net/.default"
ARC = "http://localhost:40342/metadata/identity"
CLIENT_ID = "00001111-aaaa-2222-bbbb-3333cccc4444"


# -- pure: endpoint forms and environment changes ------------------------------------------------


@pytest.mark.parametrize(
    "written",
    [
        "http://169.254.169.254/metadata/identity",
        "http://169.254.169.254/metadata/identity/oauth2/token",
        "http://169.254.169.254/metadata/identity/",
    ],
)
def test_imds_forms_reduce_to_scheme_host_port(written: str) -> None:
    """Both documented msiEndpoint forms give azure-identity only scheme+host(+port)."""
    changes = identity.environment(Identity(msi_endpoint=written), {})
    assert changes[identity.POD_HOST] == "http://169.254.169.254"


def test_imds_form_keeps_port_and_https() -> None:
    """A custom IMDS-style endpoint keeps its scheme and port."""
    written = "https://10.1.2.3:8443/metadata/identity"
    changes = identity.environment(Identity(msi_endpoint=written), {})
    assert changes[identity.POD_HOST] == "https://10.1.2.3:8443"


def test_arc_form_sets_arc_variables() -> None:
    """The Arc endpoint selects azure-identity's Arc flow (IDENTITY_ENDPOINT + IMDS_ENDPOINT)."""
    changes = identity.environment(Identity(msi_endpoint=ARC), {})
    assert changes["IDENTITY_ENDPOINT"] == "http://localhost:40342/metadata/identity/oauth2/token"
    assert changes["IMDS_ENDPOINT"] == "http://localhost:40342"
    assert identity.POD_HOST not in changes


def test_explicit_imds_endpoint_overrides_competing_flows() -> None:
    """An explicit IMDS msiEndpoint removes variables that would select another flow."""
    current = {"IDENTITY_ENDPOINT": "http://x/", "IMDS_ENDPOINT": "http://x", "MSI_ENDPOINT": "y"}
    written = "http://127.0.0.1:9/metadata/identity"
    changes = identity.environment(Identity(msi_endpoint=written), current)
    assert changes["IDENTITY_ENDPOINT"] is None
    assert changes["IMDS_ENDPOINT"] is None
    assert changes["MSI_ENDPOINT"] is None


def test_defaults_touch_no_identity_variable() -> None:
    """Without authenticationSettings only the proxy bypass for the IMDS host is added."""
    current = {identity.POD_HOST: "http://127.0.0.1:5000", "NO_PROXY": "corp.example"}
    changes = identity.environment(Identity(), current)
    assert set(changes) == {"NO_PROXY", "no_proxy"}
    assert changes["NO_PROXY"] == "corp.example,127.0.0.1"


def test_default_bypass_names_the_real_imds_address() -> None:
    """With nothing configured, 169.254.169.254 is exempted from any proxy."""
    changes = identity.environment(Identity(), {"HTTP_PROXY": "http://proxy:3128"})
    assert changes["no_proxy"] == "169.254.169.254"


def test_bypass_is_not_duplicated() -> None:
    """A host already in both no-proxy variables is left alone."""
    current = {"no_proxy": "169.254.169.254", "NO_PROXY": "169.254.169.254"}
    assert identity.environment(Identity(), current) == {}


def test_lowercase_no_proxy_is_merged_into_both() -> None:
    """requests reads no_proxy before NO_PROXY, so both get the merged list."""
    changes = identity.environment(Identity(msi_endpoint="http://127.0.0.1:7/metadata/identity"),
                                   {"no_proxy": "a.example"})
    assert changes["no_proxy"] == changes["NO_PROXY"] == "a.example,127.0.0.1"


def test_apply_sets_and_removes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`apply` writes values and removes the None ones."""
    env = {"IMDS_ENDPOINT": "http://x", "KEEP": "1"}
    identity.apply({"IMDS_ENDPOINT": None, identity.POD_HOST: "http://h"}, env)
    assert env == {"KEEP": "1", identity.POD_HOST: "http://h"}


def test_describe_names_identity_and_flow() -> None:
    """The log line says which identity and which endpoint, and nothing secret."""
    line = identity.describe(Identity(ARC, "1234"))
    assert line == "user-assigned 1234 managed identity via Azure Arc at http://localhost:40342"
    default = identity.describe(Identity())
    assert default == "system-assigned managed identity, azure-identity defaults"


def test_arc_port_is_configurable_for_stand_ins() -> None:
    """A loopback endpoint on the given Arc port is the Arc flow; another port is IMDS."""
    on_port = identity.endpoint("http://127.0.0.1:5555/metadata/identity", arc_port=5555)
    other = identity.endpoint("http://127.0.0.1:5556/metadata/identity", arc_port=5555)
    assert (on_port.kind, other.kind) == ("arc", "imds")


# -- real token flows against the IMDS / Arc stand-in --------------------------------------------


def imds_identity(imds: ImdsStandin, client_id: str | None = None) -> Identity:
    return Identity(imds.url + "/metadata/identity", client_id)


def vault_cert(kv: KeyVaultStandin, name: str) -> ObservedCertificate:
    sms = {"observedCertificates": [kv.secret_id(name)],
           "additionalVaultDnsSuffixes": ["localhost"]}
    return parse({"secretsManagementSettings": sms}).observed[0]


def fetch_error(vaults: Vaults, cert: ObservedCertificate) -> FetchError:
    with pytest.raises(FetchError) as caught:
        vaults.fetch(cert)
    return caught.value


def test_system_identity_token_is_cached(azure_env: dict[str, str], imds: ImdsStandin) -> None:
    """A system-assigned token comes from msiEndpoint once and is then served from cache."""
    cred = identity.credential(imds_identity(imds))
    tokens = {cred.get_token(KV_SCOPE).token for _ in range(3)}
    assert len(tokens) == 1 and imds.token_requests == 1
    assert imds.issued_tokens[0].client_id == SYSTEM_CLIENT_ID


def test_credential_points_azure_identity_at_endpoint(
    azure_env: dict[str, str], imds: ImdsStandin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msiEndpoint becomes AZURE_POD_IDENTITY_AUTHORITY_HOST and the IMDS host skips proxies."""
    monkeypatch.setenv(identity.POD_HOST, "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "corp.example")
    monkeypatch.delenv("no_proxy")
    identity.credential(imds_identity(imds)).get_token(KV_SCOPE)
    assert os.environ[identity.POD_HOST] == imds.url
    assert os.environ["NO_PROXY"] == os.environ["no_proxy"] == "corp.example,127.0.0.1"


def test_defaults_use_the_environment_unchanged(azure_env: dict[str, str],
                                                imds: ImdsStandin) -> None:
    """Without authenticationSettings azure-identity's own variables decide the endpoint."""
    identity.credential(Identity()).get_token(KV_SCOPE)
    assert os.environ[identity.POD_HOST] == azure_env[identity.POD_HOST]
    assert imds.token_requests == 1


def test_user_assigned_identity_by_client_id(azure_env: dict[str, str],
                                             imds: ImdsStandin) -> None:
    """msiClientId asks IMDS for that user-assigned identity's token."""
    imds.add_identity(CLIENT_ID)
    identity.credential(imds_identity(imds, CLIENT_ID)).get_token(KV_SCOPE)
    assert [t.client_id for t in imds.issued_tokens] == [CLIENT_ID]


def test_unknown_client_id_is_a_clear_error(azure_env: dict[str, str], imds: ImdsStandin,
                                            kv: KeyVaultStandin) -> None:
    """An identity IMDS does not know gives 'Identity not found' and the msiClientId hint."""
    kv.add_certificate("web", make_chain())
    cred = identity.credential(imds_identity(imds, CLIENT_ID))
    with pytest.raises(FetchError) as caught:
        Vaults(cred, connection_verify=kv.ca_path).fetch(vault_cert(kv, "web"))
    text = str(caught.value)
    assert "Identity not found" in text and "msiClientId" in text and caught.value.retryable


def test_transient_imds_errors_are_retried_by_azure_identity(
    azure_env: dict[str, str], imds: ImdsStandin
) -> None:
    """IMDS 410, 429 and 503 are retried inside one token request (backoff scaled down)."""
    for status in (410, 429, 503):
        imds.fault(status)
    cred = identity.credential(imds_identity(imds), backoff_scale=0.01)
    assert cred.get_token(KV_SCOPE).token
    assert [status for _, status in imds.requests] == [410, 429, 503, 200]


def test_imds_failure_is_retryable_and_msal_throttles_it(
    azure_env: dict[str, str], imds: ImdsStandin, kv: KeyVaultStandin
) -> None:
    """An IMDS 5xx is a retryable FetchError; MSAL replays it until Retry-After has passed."""
    version = kv.add_certificate("web", make_chain())
    imds.fault(503, times=1, retry_after=1)
    cred = identity.credential(imds_identity(imds), retry_total=0, backoff_scale=0.01)
    vaults = Vaults(cred, connection_verify=kv.ca_path)
    for _ in range(2):
        with pytest.raises(FetchError) as caught:
            vaults.fetch(vault_cert(kv, "web"))
        assert caught.value.retryable and "managed identity" in str(caught.value)
    assert imds.token_requests == 1  # the second failure came from MSAL's throttle cache
    time.sleep(1.1)  # MSAL's own clock: nothing to inject
    assert vaults.fetch(vault_cert(kv, "web")).version == version
    assert imds.token_requests == 2


def test_arc_flow_reads_the_key_file(azure_env: dict[str, str]) -> None:
    """The Arc endpoint answers 401 Basic realm=<key file>; the token comes with that key."""
    with ImdsStandin(mode="arc") as arc:
        port = int(arc.url.rsplit(":", 1)[1])
        written = f"http://localhost:{port}/metadata/identity"
        cred = identity.credential(Identity(written), arc_port=port)
        assert cred.get_token(KV_SCOPE).token
        assert [status for _, status in arc.requests] == [401, 200]
        assert os.environ["IDENTITY_ENDPOINT"] == f"http://localhost:{port}/metadata/identity/oauth2/token"
        assert all(str(k).startswith("/var/opt/azcmagent/tokens/") for k in arc.key_files)
    assert not arc.key_files


def test_failed_token_request_is_not_repeated_per_certificate(
    azure_env: dict[str, str], imds: ImdsStandin, kv: KeyVaultStandin
) -> None:
    """After a failed token request, the other certificates of the pass fail fast with it."""
    names = [f"c{i}" for i in range(6)]
    for name in names:
        kv.add_certificate(name, make_chain())
    vaults = Vaults(identity.credential(imds_identity(imds, CLIENT_ID)),
                    connection_verify=kv.ca_path)
    with ThreadPoolExecutor(3) as pool:
        errors = list(pool.map(lambda n: fetch_error(vaults, vault_cert(kv, n)), names))
    assert all("Identity not found" in str(e) for e in errors)
    assert imds.token_requests == 1


def test_unreachable_endpoint_says_so(azure_env: dict[str, str], kv: KeyVaultStandin) -> None:
    """Nothing listening at msiEndpoint: 'no response', a hint about the endpoint, retryable."""
    kv.add_certificate("web", make_chain())
    cred = identity.credential(Identity("http://127.0.0.1:9/metadata/identity"), retry_total=0)
    err = fetch_error(Vaults(cred, connection_verify=kv.ca_path), vault_cert(kv, "web"))
    assert str(err).startswith("no response from the managed identity endpoint.")
    assert "msiEndpoint" in str(err) and err.retryable


def test_imds_upgrade_is_reported_as_transient(azure_env: dict[str, str], imds: ImdsStandin,
                                               kv: KeyVaultStandin) -> None:
    """An exhausted 410 names IMDS's own reason and does not blame the identity setup."""
    kv.add_certificate("web", make_chain())
    imds.fault(410)
    cred = identity.credential(imds_identity(imds), retry_total=0)
    err = fetch_error(Vaults(cred, connection_verify=kv.ca_path), vault_cert(kv, "web"))
    assert "(gone) IMDS is being upgraded" in str(err) and "msiClientId" not in str(err)


def test_a_reload_without_msi_endpoint_leaves_nothing_of_the_old_one() -> None:
    """IMDS stand-in, then Arc, then defaults: each switch undoes the previous one's variables,
    and what the process had before is back in the end."""
    env = {identity.POD_HOST: "http://127.0.0.1:9", "NO_PROXY": "a.example,127.0.0.1",
           "no_proxy": "a.example,127.0.0.1"}
    before = dict(env)
    written: dict[str, tuple[str | None, str | None]] = {}
    identity.switch(Identity(msi_endpoint="http://127.0.0.1:8123/metadata/identity"), env,
                    written)
    assert env[identity.POD_HOST] == "http://127.0.0.1:8123"
    identity.switch(Identity(msi_endpoint=ARC), env, written)
    assert env[identity.POD_HOST] == before[identity.POD_HOST]  # Arc's variables take precedence
    assert env["IDENTITY_ENDPOINT"].startswith("http://localhost:40342/")
    identity.switch(Identity(), env, written)
    assert env == before


def test_a_variable_changed_by_someone_else_is_left_alone() -> None:
    """Only what the last switch wrote and is still in place is undone."""
    env: dict[str, str] = {}
    written: dict[str, tuple[str | None, str | None]] = {}
    identity.switch(Identity(msi_endpoint="http://127.0.0.1:8123/metadata/identity"), env,
                    written)
    env[identity.POD_HOST] = "http://127.0.0.1:7777"
    identity.switch(Identity(), env, written)
    assert env[identity.POD_HOST] == "http://127.0.0.1:7777"
