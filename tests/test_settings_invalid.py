"""Invalid settings: every case names its JSON path and a hint a user can act on."""
from __future__ import annotations

import json
from typing import Any

import pytest

from akvvm_ext.errors import SettingsError
from akvvm_ext.settings import merge, parse

URL = "https://myvault.vault.azure.net/secrets/mycert"
SMS = "secretsManagementSettings"
OC = f"{SMS}.observedCertificates"
GUID = "00001111-aaaa-2222-bbbb-3333cccc4444"


def base(**sms: Any) -> dict[str, Any]:
    return {SMS: {"observedCertificates": [URL], **sms}}


def certs(*items: Any, **sms: Any) -> dict[str, Any]:
    return {SMS: {"observedCertificates": list(items), **sms}}


def cert(**fields: Any) -> dict[str, Any]:
    return certs({"url": URL, **fields})


def auth(**fields: Any) -> dict[str, Any]:
    return {**base(), "authenticationSettings": fields}


def logging(**fields: Any) -> dict[str, Any]:
    return {**base(), "loggingSettings": {"endpoint": "tcp://localhost:24224", **fields}}


ESCAPED = "Get-Content -Raw settings.json"
CASES: list[tuple[str, object, str, str]] = [
    ("root-array", [], "settings", "Give the settings as a JSON object"),
    ("root-json-string", json.dumps(base()), "settings", ESCAPED),
    ("root-escaped-quotes", json.dumps(base()).replace('"', '\\"'), "settings", ESCAPED),
    ("root-plain-string", "hello", "settings", ESCAPED),
    ("sms-missing", {}, SMS, "Write it as an object"),
    ("sms-null", {SMS: None}, SMS, "Write it as an object"),
    ("sms-json-string", {SMS: json.dumps(base()[SMS])}, SMS, ESCAPED),
    ("observed-missing", {SMS: {}}, OC, "Give an array"),
    ("observed-comma-string", {SMS: {"observedCertificates": f"{URL},{URL}2"}}, OC,
     "comma-separated string is not accepted"),
    ("observed-escaped-json", {SMS: {"observedCertificates": json.dumps([URL])}}, OC, ESCAPED),
    ("item-number", certs(5), f"{OC}[0]", "URL string or an object"),
    ("item-no-url", certs({"customSymbolicLinkName": "x"}), f"{OC}[0].url", "Write the URL"),
    ("url-number", certs({"url": 3}), f"{OC}[0].url", "Write the URL"),
    ("url-http", certs("http://myvault.vault.azure.net/secrets/c"), f"{OC}[0]", "https only"),
    ("url-no-host", certs("https:///secrets/c"), f"{OC}[0]", "has no host"),
    ("url-certificates", certs(URL.replace("/secrets/", "/certificates/")), f"{OC}[0]",
     f"instead: {URL}."),
    ("url-certificates-version", cert(url=URL.replace("secrets", "certificates") + "/" + "a" * 32),
     f"{OC}[0].url", f"instead: {URL}/{'a' * 32}."),
    ("url-keys", certs("https://myvault.vault.azure.net/keys/k"), f"{OC}[0]", "/secrets/<name>"),
    ("url-query", certs(URL + "?api-version=7.4"), f"{OC}[0]", "Remove everything from '?'"),
    ("url-fragment", certs(URL + "#x"), f"{OC}[0]", "Remove everything from '?' or '#'"),
    ("url-foreign-host", certs("https://example.com/secrets/c"), f"{OC}[0]",
     "additionalVaultDnsSuffixes"),
    ("url-not-label-boundary", certs("https://notvault.azure.net/secrets/c"), f"{OC}[0]",
     "additionalVaultDnsSuffixes"),
    ("url-bare-suffix", certs("https://vault.azure.net/secrets/c"), f"{OC}[0]",
     "myvault.vault.azure.net"),
    ("url-extra-suffix-boundary",
     certs("https://v.notlocal/secrets/c", additionalVaultDnsSuffixes=["local"]), f"{OC}[0]",
     "additionalVaultDnsSuffixes"),
    ("url-bad-name", certs("https://myvault.vault.azure.net/secrets/my_cert"), f"{OC}[0]",
     "1-127 letters, digits and dashes"),
    ("url-long-name", certs("https://myvault.vault.azure.net/secrets/" + "a" * 128), f"{OC}[0]",
     "1-127 letters"),
    ("url-bad-version", certs(URL + "/123"), f"{OC}[0]", "32 hex digits"),
    ("url-extra-segments", certs(URL + "/" + "a" * 32 + "/x"), f"{OC}[0]", "/secrets/<name>"),
    ("url-placeholder", certs("https://<examplekv>.vault.azure.net/secrets/c"), f"{OC}[0]",
     "Replace it with your vault"),
    ("url-spaces", certs(URL + " "), f"{OC}[0]", "Remove them"),
    ("url-userinfo", certs("https://u:p@myvault.vault.azure.net/secrets/c"), f"{OC}[0]",
     "up to '@'"),
    ("url-bad-port", certs("https://myvault.vault.azure.net:99999/secrets/c"), f"{OC}[0]",
     "https://<vault>.vault.azure.net/secrets/<name>"),
    ("polling-zero-string", base(pollingIntervalInS="0"), f"{SMS}.pollingIntervalInS",
     'Use e.g. "3600"'),
    ("polling-not-digits", base(pollingIntervalInS="1h"), f"{SMS}.pollingIntervalInS",
     "Write a whole number of seconds"),
    ("polling-zero-number", base(pollingIntervalInS=0), f"{SMS}.pollingIntervalInS",
     "Write a whole number of seconds"),
    ("polling-bool", base(pollingIntervalInS=True), f"{SMS}.pollingIntervalInS",
     "Write a whole number"),
    ("polling-fraction", base(pollingIntervalInS=1.5), f"{SMS}.pollingIntervalInS",
     "Write a whole number"),
    ("initial-sync-string", base(requireInitialSync="true"), f"{SMS}.requireInitialSync",
     "Write true without quotes"),
    ("acl-enabled-string", base(aclEnabled="False"), f"{SMS}.aclEnabled",
     "Write false without quotes"),
    ("initial-sync-number", base(requireInitialSync=1), f"{SMS}.requireInitialSync",
     "Write true or false"),
    ("store-relative", base(certificateStoreLocation="certs"), f"{SMS}.certificateStoreLocation",
     "Use an absolute path"),
    ("store-nul", base(certificateStoreLocation="/var/x\0y"), f"{SMS}.certificateStoreLocation",
     "Remove it"),
    ("cert-store-relative", cert(certificateStoreLocation="./app1"),
     f"{OC}[0].certificateStoreLocation", "Use an absolute path"),
    ("link-slash", cert(customSymbolicLinkName="a/b"), f"{OC}[0].customSymbolicLinkName",
     "plain file name"),
    ("link-dotdot", cert(customSymbolicLinkName=".."), f"{OC}[0].customSymbolicLinkName",
     "plain file name"),
    ("link-empty", cert(customSymbolicLinkName=""), f"{OC}[0].customSymbolicLinkName",
     "plain file name"),
    ("link-duplicate",
     certs({"url": URL, "customSymbolicLinkName": "web"},
           {"url": URL + "2", "customSymbolicLinkName": "web"}),
     f"{OC}[1]", "its own customSymbolicLinkName"),
    ("link-duplicate-double-slash",
     certs({"url": URL, "certificateStoreLocation": "//etc/ssl/app", "customSymbolicLinkName": "w"},
           {"url": URL + "2", "certificateStoreLocation": "/etc/ssl/app",
            "customSymbolicLinkName": "w"}),
     f"{OC}[1]", "its own customSymbolicLinkName"),
    ("link-too-long", cert(customSymbolicLinkName="a" * 234), f"{OC}[0].customSymbolicLinkName",
     "at most 233 characters"),
    ("link-too-many-bytes", cert(customSymbolicLinkName="\u00e9" * 117),  # 234 bytes in UTF-8
     f"{OC}[0].customSymbolicLinkName", "Use a shorter name"),
    ("polling-thousands-of-digits", base(pollingIntervalInS="9" * 5000),
     f"{SMS}.pollingIntervalInS", "3600"),
    ("link-duplicate-default",
     certs(URL, {"url": URL + "2", "customSymbolicLinkName": "myvault.mycert"}),
     f"{OC}[1]", "its own customSymbolicLinkName"),
    ("same-secret-twice", certs(URL, {"url": URL, "customSymbolicLinkName": "other"}), f"{OC}[1]",
     "Observe each secret once per store directory"),
    ("same-prefix-other-cloud", certs(URL, URL.replace("azure.net", "azure.cn")), f"{OC}[1]",
     "link"),
    ("same-prefix-case", certs(URL, {"url": URL.replace("myvault", "MyVault"),
                                     "customSymbolicLinkName": "x"}),
     f"{OC}[1]", "Observe each secret once"),
    ("link-is-version-file", certs(URL, {"url": URL + "2",
                                         "customSymbolicLinkName": "myvault.mycert." + "b" * 32}),
     f"{OC}[1].customSymbolicLinkName", "Choose another link name"),
    ("acls-object", cert(acls={"user": "app1"}), f"{OC}[0].acls", "Give an array of objects"),
    ("acl-empty", cert(acls=[{}]), f"{OC}[0].acls[0]", 'Give "user", "group" or both'),
    ("acl-user-colon", cert(acls=[{"user": "a:b"}]), f"{OC}[0].acls[0].user",
     "Give a user name or a numeric uid"),
    ("acl-group-negative", cert(acls=[{"group": -1}]), f"{OC}[0].acls[0].group",
     "numeric gid"),
    ("acl-user-bool", cert(acls=[{"user": True}]), f"{OC}[0].acls[0].user", "numeric uid"),
    ("client-id-resource-id",
     auth(msiClientId="/subscriptions/0/resourceGroups/rg/providers/"
          "Microsoft.ManagedIdentity/userAssignedIdentities/id1"),
     "authenticationSettings.msiClientId", "az identity show"),
    ("client-id-placeholder", auth(msiClientId="xxxxxx-xxxx-xxxx-xxxx-xxxxxxxx"),
     "authenticationSettings.msiClientId", "a GUID such as"),
    ("client-id-number", auth(msiClientId=5), "authenticationSettings.msiClientId",
     "a GUID such as"),
    ("endpoint-ftp", auth(msiEndpoint="ftp://169.254.169.254/metadata/identity"),
     "authenticationSettings.msiEndpoint", "http://localhost:40342/metadata/identity"),
    ("endpoint-other-path", auth(msiEndpoint="http://169.254.169.254/other"),
     "authenticationSettings.msiEndpoint", "/metadata/identity/oauth2/token"),
    ("endpoint-no-host", auth(msiEndpoint="http:///metadata/identity"),
     "authenticationSettings.msiEndpoint", "http://169.254.169.254/metadata/identity"),
    ("endpoint-password", auth(msiEndpoint="http://u:p@127.0.0.1:8/metadata/identity"),
     "authenticationSettings.msiEndpoint", "remove the part before '@'"),
    ("endpoint-port-zero", auth(msiEndpoint="http://127.0.0.1:0/metadata/identity"),
     "authenticationSettings.msiEndpoint", "the port the endpoint listens on"),
    ("endpoint-empty-port", auth(msiEndpoint="http://127.0.0.1:/metadata/identity"),
     "authenticationSettings.msiEndpoint", "the port the endpoint listens on"),
    ("auth-string", {**base(), "authenticationSettings": "x"}, "authenticationSettings",
     "Write it as an object"),
    ("logging-no-endpoint", {**base(), "loggingSettings": {"logger": "fluentd"}},
     "loggingSettings.endpoint", "tcp://<host>:<port>"),
    ("logging-logger", logging(logger="syslog"), "loggingSettings.logger", "only logger"),
    ("logging-format", logging(format="json"), "loggingSettings.format", "only format"),
    ("logging-udp", logging(endpoint="udp://localhost:24224"), "loggingSettings.endpoint",
     "unix:///<path>"),
    ("logging-bad-port", logging(endpoint="tcp://localhost:http"), "loggingSettings.endpoint",
     "tcp://localhost:24224"),
    ("logging-unix-relative", logging(endpoint="unix://run/fluent.sock"),
     "loggingSettings.endpoint", "unix:///<path>"),
    ("logging-servicename", logging(servicename=""), "loggingSettings.servicename",
     "non-empty tag"),
    ("suffix-invalid", base(additionalVaultDnsSuffixes=["bad suffix"]),
     f"{SMS}.additionalVaultDnsSuffixes[0]", "DNS suffix"),
    ("suffixes-string", base(additionalVaultDnsSuffixes="local"),
     f"{SMS}.additionalVaultDnsSuffixes", "Give an array of DNS suffixes"),
]


def problems_of(raw: object) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        parse(raw)
    return caught.value.problems


@pytest.mark.parametrize(("raw", "path", "hint"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_settings_name_path_and_hint(raw: object, path: str, hint: str) -> None:
    """Each invalid setting yields a problem at its JSON path whose text carries the fix."""
    found = [p for p in problems_of(raw) if p.startswith(f"{path}: ")]
    assert found, problems_of(raw)
    assert any(hint in p for p in found), found


def test_there_are_at_least_forty_invalid_cases() -> None:
    """The table above keeps covering the issue's minimum of 40 invalid cases."""
    assert len(CASES) >= 40


def test_every_problem_is_reported_at_once() -> None:
    """Several independent mistakes all appear in one SettingsError."""
    raw = certs("http://myvault.vault.azure.net/secrets/a", {"url": URL, "acls": [{}]},
                pollingIntervalInS="x", requireInitialSync="yes")
    raw["loggingSettings"] = {"logger": "syslog"}
    paths = {p.split(": ")[0] for p in problems_of(raw)}
    assert paths == {
        f"{OC}[0]", f"{OC}[1].acls[0]", f"{SMS}.pollingIntervalInS",
        f"{SMS}.requireInitialSync", "loggingSettings.logger", "loggingSettings.endpoint",
    }


def test_error_text_lists_each_problem() -> None:
    """str(SettingsError) carries every problem sentence."""
    with pytest.raises(SettingsError) as caught:
        parse(base(pollingIntervalInS="x", aclEnabled="no"))
    assert f"{SMS}.pollingIntervalInS" in str(caught.value)
    assert f"{SMS}.aclEnabled" in str(caught.value)


def test_problem_sentence_shape() -> None:
    """A problem reads `<json path>: <problem>. <hint>.`"""
    [problem] = problems_of(base(requireInitialSync="true"))
    assert problem == (f"{SMS}.requireInitialSync: must be true or false, not a string. "
                       "Write true without quotes.")


SECRET = "S3cr3t-SENTINEL-value-9f8e"


def test_protected_values_never_appear_in_problems_or_notes() -> None:
    """Wrong protected values are named by path only; their text never appears in messages."""
    protected = {
        SMS: {"pollingIntervalInS": SECRET, "requireInitialSync": SECRET, "aclEnabled": [SECRET],
              "unknownKey": SECRET, "additionalVaultDnsSuffixes": [SECRET + " x"],
              "observedCertificates": [{"url": URL, "acls": [{"user": SECRET + ":x"}],
                                        "certificateStoreLocation": SECRET}]},
        "authenticationSettings": {"msiClientId": SECRET, "msiEndpoint": SECRET},
        "loggingSettings": {"endpoint": SECRET, "servicename": 7, "logger": SECRET},
        "extra": {"token": SECRET},
    }
    with pytest.raises(SettingsError) as caught:
        parse(merge(base(), protected))
    assert len(caught.value.problems) >= 10
    assert SECRET not in str(caught.value)
    assert not [p for p in caught.value.problems if SECRET in p]


def test_protected_unknown_values_stay_out_of_notes() -> None:
    """Unknown protected keys are noted by path, never with their value."""
    settings = parse(merge(base(), {"sasToken": SECRET, SMS: {"password": SECRET}}))
    assert settings.notes and not [n for n in settings.notes if SECRET in n]


def test_merge_rejects_escaped_public_settings_with_the_fix() -> None:
    """publicSettings sent as a JSON string fail with the PowerShell fix, not 'not an object'."""
    with pytest.raises(SettingsError) as caught:
        merge(json.dumps(base()), None)
    assert ESCAPED in str(caught.value)
    assert "not an object" not in str(caught.value)


def test_merge_rejects_a_list() -> None:
    """Settings that are neither an object nor null are a problem at the root."""
    with pytest.raises(SettingsError, match="settings: must be an object, not an array"):
        merge([], None)


def test_escaped_root_also_reports_inner_problems() -> None:
    """Escaped settings are looked into: their own mistakes are reported in the same pass."""
    problems = problems_of(json.dumps(base(pollingIntervalInS="x")))
    assert problems[0].startswith("settings: ")
    assert any(p.startswith(f"{SMS}.pollingIntervalInS: ") for p in problems)


def test_problems_come_in_document_order() -> None:
    """Problems are listed as the settings read: by key order, then certificate by certificate."""
    raw = certs("http://myvault.vault.azure.net/secrets/a", {"url": 3},
                "https://example.com/secrets/c", requireInitialSync="yes")
    raw["authenticationSettings"] = {"msiClientId": "nope"}
    paths = [p.split(": ")[0] for p in problems_of(raw)]
    assert paths == [f"{SMS}.requireInitialSync", f"{OC}[0]", f"{OC}[1].url", f"{OC}[2]",
                     "authenticationSettings.msiClientId"]
