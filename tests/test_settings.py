"""Valid settings: the documented examples, both observedCertificates forms, defaults and notes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from akvvm_ext import schema
from akvvm_ext.errors import SettingsError
from akvvm_ext.model import DEFAULT_POLLING_INTERVAL_S, DEFAULT_STORE, AclGrant, Identity
from akvvm_ext.settings import merge, parse, plan

DATA = Path(__file__).parent / "data" / "settings"
URL = "https://myvault.vault.azure.net/secrets/mycert"
SMS = "secretsManagementSettings"
GUID = "00001111-aaaa-2222-bbbb-3333cccc4444"


def load(name: str) -> Any:
    text = (DATA / name).read_text()
    return json.loads(text.replace('"app2",', '"app2"'))  # the seed's trailing comma


def base(*observed: Any, **sms: Any) -> dict[str, Any]:
    return {SMS: {"observedCertificates": list(observed or [URL]), **sms}}


def test_seed_extension_schema_example() -> None:
    """The ARM 'Extension schema' example parses into the documented store layout."""
    settings = parse(load("seed_arm_extension_schema.json"))
    first, second = settings.observed
    assert (first.store_dir, first.link_name) == ("/var/lib/waagent/Microsoft.Azure.KeyVault/app1",
                                                  "app1Cert1")
    assert first.acls == (AclGrant("app1", "appGroup1"), AclGrant("service1", None))
    assert (second.link_name, second.acls) == ("myvault.mycertificate2", (AclGrant("app2"),))
    assert settings.require_initial_sync and settings.acl_enabled
    assert settings.logging is not None and (settings.logging.host, settings.logging.port) == (
        "localhost", 24224)
    assert settings.identity == Identity("http://169.254.169.254/metadata/identity", GUID)
    assert any("linkOnRenewal: is ignored on Linux" in n for n in settings.notes)


def test_seed_template_deployment_example() -> None:
    """The ARM template example: two certs in the default store, certificateStoreName noted."""
    settings = parse(load("seed_arm_template_deployment.json"))
    assert [c.link_name for c in settings.observed] == ["myvault.mycertificate1",
                                                        "myvault.mycertificate2"]
    assert {c.store_dir for c in settings.observed} == {DEFAULT_STORE}
    assert not settings.require_initial_sync
    assert any("observedCertificates[1].certificateStoreName: is ignored" in n
               for n in settings.notes)


def test_seed_cli_example_with_oauth2_token_endpoint() -> None:
    """The CLI/PowerShell example (…/oauth2/token endpoint) parses."""
    settings = parse(load("seed_cli_settings.json"))
    assert settings.identity.msi_endpoint == "http://169.254.169.254/metadata/identity/oauth2/token"
    assert [c.vault_name for c in settings.observed] == ["examplekv", "examplekv"]


def test_seed_cli_example_verbatim_names_each_placeholder() -> None:
    """Printed as is, the CLI example fails on its two URL placeholders and the x-ed client id."""
    with pytest.raises(SettingsError) as caught:
        parse(load("seed_cli_settings_verbatim.json"))
    paths = [p.split(": ")[0] for p in caught.value.problems]
    assert paths == [f"{SMS}.observedCertificates[0].url", f"{SMS}.observedCertificates[1].url",
                     "authenticationSettings.msiClientId"]


def test_scale_set_resource_properties_are_noted_not_fatal() -> None:
    """autoUpgradeMinorVersion/enableAutomaticUpgrade inside secretsManagementSettings are notes."""
    settings = parse(load("scale_set.json"))
    assert len(settings.observed) == 2
    for key in ("autoUpgradeMinorVersion", "enableAutomaticUpgrade"):
        assert any(n.startswith(f"{SMS}.{key}: unknown setting, ignored. It is a property of the "
                                "extension resource") for n in settings.notes)


def test_url_strings_form_of_1x_and_2x() -> None:
    """observedCertificates as plain URL strings get default store and link."""
    [cert] = parse(base(URL)).observed
    assert (cert.vault_name, cert.secret_name, cert.version) == ("myvault", "mycert", None)
    assert (cert.store_dir, cert.link_name, cert.file_prefix) == (DEFAULT_STORE, "myvault.mycert",
                                                                  "myvault.mycert")
    assert cert.vault_url == "https://myvault.vault.azure.net"


def test_defaults_match_the_schema() -> None:
    """Defaults applied by the parser are the ones the schema (and so the docs) announce."""
    settings = parse(base())
    props = schema.resolve(schema.schema()["$defs"][SMS])["properties"]
    assert settings.polling_interval_s == DEFAULT_POLLING_INTERVAL_S == int(
        props["pollingIntervalInS"]["default"])
    assert settings.require_initial_sync is props["requireInitialSync"]["default"] is False
    assert settings.acl_enabled is props["aclEnabled"]["default"] is True
    assert settings.observed[0].store_dir == props["certificateStoreLocation"]["default"]
    assert settings.identity == Identity() and settings.logging is None


def test_pinned_version_and_case_of_vault_name_are_kept() -> None:
    """A /<version> pins the version; the vault label keeps the case it was written in."""
    [cert] = parse(base(f"https://MyVault.vault.azure.net/secrets/web/{'ab' * 16}")).observed
    assert (cert.vault_name, cert.version, cert.link_name) == ("MyVault", "ab" * 16, "MyVault.web")


def test_trailing_slash_and_secrets_case_are_normalised() -> None:
    """https://v…/Secrets/name/ is the same secret as https://v…/secrets/name."""
    [cert] = parse(base("https://myvault.vault.azure.net/Secrets/mycert/")).observed
    assert cert.url == URL


@pytest.mark.parametrize("host", ["v.vault.azure.cn", "v.vault.usgovcloudapi.net",
                                  "v.vault.microsoftazure.de", "hsm.managedhsm.azure.net"])
def test_sovereign_clouds_and_managed_hsm_hosts(host: str) -> None:
    """Key Vault hosts of every Azure cloud are accepted without extra settings."""
    [cert] = parse(base(f"https://{host}/secrets/c")).observed
    assert not cert.relaxed_challenge


def test_additional_suffix_relaxes_the_challenge_check() -> None:
    """A host allowed only by additionalVaultDnsSuffixes (e.g. localhost:port) is relaxed."""
    raw = base("https://localhost:8443/secrets/web", "https://kv1.vault.azure.net/secrets/web",
               additionalVaultDnsSuffixes=["localhost", "vault.azure.net"])
    local, public = parse(raw).observed
    assert (local.vault_name, local.vault_url, local.relaxed_challenge) == (
        "localhost", "https://localhost:8443", True)
    assert not public.relaxed_challenge


def test_additional_suffix_with_leading_dot_matches_on_label_boundary() -> None:
    """".azurestack.local" allows kv.azurestack.local."""
    [cert] = parse(base("https://kv.vault.azurestack.local/secrets/a",
                        additionalVaultDnsSuffixes=[".azurestack.local"])).observed
    assert cert.relaxed_challenge and cert.vault_name == "kv"


@pytest.mark.parametrize("number", [600, 600.0])
def test_number_polling_interval_is_accepted_with_a_note(number: float) -> None:
    """pollingIntervalInS 600 or 600.0 (a JSON number) works and is noted."""
    settings = parse(base(pollingIntervalInS=number))
    assert settings.polling_interval_s == 600
    assert any("pollingIntervalInS: is a JSON number" in n for n in settings.notes)


def test_short_polling_interval_warns() -> None:
    """Below 300 s the plan carries a throttling warning."""
    settings = parse(base(pollingIntervalInS="60"))
    assert settings.polling_interval_s == 60
    assert any("throttling" in n for n in settings.notes)


def test_acls_are_not_applied_when_disabled() -> None:
    """aclEnabled false: acls are validated, dropped from the certificate and noted."""
    settings = parse(base({"url": URL, "acls": [{"user": "app1"}, {"group": 1000}]},
                          {"url": URL + "2", "acls": [{"user": "app2"}]}, aclEnabled=False))
    assert [c.acls for c in settings.observed] == [(), ()]
    assert settings.notes == (f"{SMS}.observedCertificates[0].acls: is not applied because "
                              "aclEnabled is false (nor those of 1 more certificate(s)).",)


def test_numeric_acl_ids_become_strings() -> None:
    """uid/gid given as numbers are kept as their decimal text."""
    [cert] = parse(base({"url": URL, "acls": [{"user": 0, "group": 1000.0}]})).observed
    assert cert.acls == (AclGrant("0", "1000"),)


def test_same_secret_in_two_store_dirs_is_fine() -> None:
    """One secret may be installed in two different directories."""
    raw = base(URL, {"url": URL, "certificateStoreLocation": "/etc/ssl/app"})
    assert [c.store_dir for c in parse(raw).observed] == [DEFAULT_STORE, "/etc/ssl/app"]


def test_store_paths_are_normalised() -> None:
    """'/srv//certs/' and '/srv/certs' are one directory, so their links collide."""
    raw = base({"url": URL, "certificateStoreLocation": "/srv//certs/",
                "customSymbolicLinkName": "x"},
               {"url": URL + "2", "certificateStoreLocation": "/srv/certs",
                "customSymbolicLinkName": "x"})
    clash = "observedCertificates\\[1\\]: uses the link /srv/certs/x"
    with pytest.raises(SettingsError, match=clash):
        parse(raw)


@pytest.mark.parametrize("endpoint", ["http://169.254.169.254/metadata/identity",
                                      "http://169.254.169.254/metadata/identity/oauth2/token",
                                      "http://localhost:40342/metadata/identity",
                                      "https://127.0.0.1:8080/metadata/identity/"])
def test_identity_endpoint_forms(endpoint: str) -> None:
    """IMDS, token path and Azure Arc endpoints are accepted as written."""
    settings = parse({**base(), "authenticationSettings": {"msiEndpoint": endpoint}})
    assert settings.identity == Identity(endpoint, None)


def test_client_id_without_endpoint_uses_default_imds() -> None:
    """msiClientId alone is accepted; the note says the default endpoint is used."""
    settings = parse({**base(), "authenticationSettings": {"msiClientId": GUID}})
    assert settings.identity == Identity(None, GUID)
    assert any("msiClientId: is given without msiEndpoint" in n for n in settings.notes)


def test_empty_client_id_means_none() -> None:
    """msiClientId "" (common in templates) selects no user-assigned identity."""
    settings = parse({**base(), "authenticationSettings": {"msiClientId": ""}})
    assert settings.identity == Identity()


def test_endpoint_query_is_ignored_with_a_note() -> None:
    """A copied token URL with ?api-version=… works; the query is noted as ignored."""
    endpoint = "http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01"
    settings = parse({**base(), "authenticationSettings": {"msiEndpoint": endpoint}})
    assert any("query string, which is ignored" in n for n in settings.notes)


def test_fluentd_unix_socket_and_default_port() -> None:
    """unix:///path and tcp://host without port (24224) both work; servicename defaults."""
    unix = parse({**base(), "loggingSettings": {"endpoint": "unix:///run/td-agent.sock"}}).logging
    tcp = parse({**base(), "loggingSettings": {"endpoint": "tcp://fluent", "servicename": "web"}})
    assert unix is not None and (unix.unix_path, unix.servicename) == ("/run/td-agent.sock",
                                                                       "akvvm_service")
    assert tcp.logging is not None and (tcp.logging.host, tcp.logging.port) == ("fluent", 24224)
    assert tcp.logging.servicename == "web"


def test_empty_observed_list_is_noted() -> None:
    """An empty observedCertificates is allowed and noted."""
    settings = parse({SMS: {"observedCertificates": []}})
    assert settings.observed == () and any("nothing will be observed" in n for n in settings.notes)


def test_merge_protected_wins_deeply() -> None:
    """Protected settings override public ones key by key, nested objects merged."""
    public = {SMS: {"observedCertificates": [URL], "pollingIntervalInS": "60"},
              "authenticationSettings": {"msiEndpoint": "http://localhost:40342/metadata/identity"}}
    protected = {SMS: {"pollingIntervalInS": "7200"},
                 "authenticationSettings": {"msiClientId": GUID}}
    merged = merge(public, protected)
    assert merged[SMS] == {"observedCertificates": [URL], "pollingIntervalInS": "7200"}
    assert merged["authenticationSettings"] == {
        "msiEndpoint": "http://localhost:40342/metadata/identity", "msiClientId": GUID}
    assert public[SMS]["pollingIntervalInS"] == "60"  # inputs untouched


def test_merge_of_null_public_settings() -> None:
    """publicSettings null with protected settings gives the protected ones."""
    assert merge(None, base()) == base() and merge(None, None) == {}


def test_plan_is_json_and_shows_the_layout() -> None:
    """plan() gives link, version file pattern, 'latest', identity and notes as JSON."""
    raw = {**base({"url": URL, "customSymbolicLinkName": "web.pem", "acls": [{"user": "www"}]}),
           "authenticationSettings": {"msiClientId": GUID}}
    shown = json.loads(json.dumps(plan(parse(raw))))
    [cert] = shown["certificates"]
    assert cert["link"] == f"{DEFAULT_STORE}/web.pem"
    assert cert["versionFiles"] == f"{DEFAULT_STORE}/myvault.mycert.<version>"
    assert cert["version"] == "latest" and cert["acls"] == [{"user": "www", "group": None}]
    assert shown["identity"]["msiClientId"] == GUID and shown["identity"]["kind"] == "user-assigned"
    assert shown["pollingIntervalInS"] == 3600 and shown["logging"] is None
    assert shown["notes"]


def test_misspelt_key_note_suggests_the_right_name() -> None:
    """An unknown key close to a known one is noted with a suggestion."""
    settings = parse(base(PollingIntervalInS="60", requireInitalSync=True))
    assert f"{SMS}.PollingIntervalInS: unknown setting, ignored. Did you mean " \
           "pollingIntervalInS? Names are case-sensitive." in settings.notes
    assert any("Did you mean requireInitialSync?" in n for n in settings.notes)


def test_repeated_notes_are_noted_once() -> None:
    """An unknown key or certificateStoreName on 300 certificates gives one note each."""
    items = [{"url": f"{URL}{i}", "certificateStoreName": "MY", "foo": 1} for i in range(300)]
    notes = parse(base(*items)).notes
    assert notes == (
        f"{SMS}.observedCertificates[0].foo: unknown setting, ignored (also in 299 more place(s)). "
        "Check its spelling and place against docs/settings.md.",
        f"{SMS}.observedCertificates[0].certificateStoreName: is ignored on Linux (also in 299 "
        "more certificate(s)).",
    )
