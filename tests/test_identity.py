"""The managed-identity credential: endpoint forms, the environment it sets, real token flows."""
from __future__ import annotations

import pytest

from akvvm_ext import identity
from akvvm_ext.model import Identity

KV_SCOPE = "https://vault.azure.net/.default"
ARC = "http://localhost:40342/metadata/identity"


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
