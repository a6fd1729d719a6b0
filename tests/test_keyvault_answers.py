"""Answers a vault or what stands in front of it may give, and what the admin is told."""
from __future__ import annotations

from akvvm_ext.keyvault import Vaults
from tests.standins.certfactory import make_chain
from tests.standins.keyvault import KeyVaultStandin
from tests.test_keyvault import fetch_error, observed, vaults  # noqa: F401 - the fixture


def test_proxy_page_instead_of_a_secret_is_retryable_and_says_so(
    vaults: Vaults, kv: KeyVaultStandin  # noqa: F811 - the fixture
) -> None:
    """A 200 HTML page (a filtering proxy) is not a challenge problem: retryable, names a proxy,
    and the next answer from the vault is used."""
    version = kv.add_certificate("web", make_chain())
    kv.fault("web", "proxy_page")
    err = fetch_error(vaults, observed(kv, "web"))
    assert err.retryable
    assert "not the JSON" in err.message and "proxy" in str(err)
    assert "challenge" not in str(err) and "<html>" not in str(err)
    assert vaults.fetch(observed(kv, "web")).version == version


def test_firewall_refusal_points_at_network_rules_not_roles(
    vaults: Vaults, kv: KeyVaultStandin  # noqa: F811 - the fixture
) -> None:
    """403 ForbiddenByFirewall: the hint is about the vault's network rules, not a role."""
    kv.add_certificate("web", make_chain())
    kv.fault("web", "forbidden", inner="ForbiddenByFirewall")
    err = fetch_error(vaults, observed(kv, "web"))
    assert err.status == 403 and err.retryable
    assert "network rules" in err.hint and "private endpoint" in err.hint
    assert "Key Vault Secrets User" not in str(err)


def test_a_broken_answer_never_quotes_the_secret_in_the_error(
    vaults: Vaults, kv: KeyVaultStandin  # noqa: F811 - the fixture
) -> None:
    """A 200 under a false `Transfer-Encoding: chunked` makes the client read the start of the
    secret as a chunk length; the error names what broke, never the bytes it choked on."""
    kv.add_certificate("web", make_chain())
    kv.fault("web", "false_chunked", times=3)
    err = fetch_error(vaults, observed(kv, "web"))
    assert err.retryable and "vault localhost" in str(err)
    assert kv.value("web")[:24] not in str(err) and '"value"' not in str(err)
